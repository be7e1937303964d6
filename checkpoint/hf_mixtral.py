"""The Mixtral mapping (`MixtralForCausalLM`): tensor names and config.json, both directions.

Mixtral is Llama's attention and norms with every MLP replaced by a sparse MoE block: a
softmax router (``block_sparse_moe.gate``, no bias) choosing the top k of E experts with
renormalised weights, each expert a SwiGLU (``w1`` gate, ``w3`` up, ``w2`` down). That is
trident's MoE with ``moe_router=softmax``, ``moe_layer_freq=1``, no shared experts and
no selection bias; anything else is refused with a `UserError` naming the setting.

Files use the Hub layout (one tensor per expert, ``block_sparse_moe.experts.E.w1.weight``),
which every transformers version reads; import also accepts the fused layout transformers
5 keeps in memory (``mlp.experts.gate_up_proj`` [E, 2f, h], ``mlp.experts.down_proj``
[E, h, f], ``mlp.gate.weight``), in case a folder was written that way.
"""

from __future__ import annotations

import dataclasses

import torch

from trident.checkpoint.hf_files import need
from trident.checkpoint.hf_llama import config_from_llama, llama_config
from trident.errors import UserError
from trident.model.config import ModelConfig

_ATTENTION = [
    ("norm1.weight", "input_layernorm.weight"),
    ("attn.qkv.q.weight", "self_attn.q_proj.weight"),
    ("attn.qkv.k.weight", "self_attn.k_proj.weight"),
    ("attn.qkv.v.weight", "self_attn.v_proj.weight"),
    ("attn.proj.weight", "self_attn.o_proj.weight"),
    ("norm2.weight", "post_attention_layernorm.weight"),
    ("mlp.router.weight", "block_sparse_moe.gate.weight"),
]
_EXPERT = [("gate", "w1"), ("up", "w3"), ("down", "w2")]


def check_mixtral(cfg: ModelConfig) -> None:
    """Raise a `UserError` naming the first MoE setting that Mixtral cannot express."""
    problems = [
        (cfg.moe_router != "softmax", f"the {cfg.moe_router!r} router (Mixtral's is softmax)"),
        (cfg.moe_layer_freq != 1, f"dense blocks between MoE blocks (model.moe_layer_freq={cfg.moe_layer_freq})"),
        (cfg.moe_shared_experts > 0, f"shared experts (model.moe_shared_experts={cfg.moe_shared_experts})"),
        (cfg.moe_bias_update_rate > 0, "the aux-loss-free selection bias (model.moe_bias_update_rate > 0)"),
    ]
    for bad, what in problems:
        if bad:
            raise UserError(f"cannot export to Hugging Face Mixtral: {what} has no equivalent in MixtralForCausalLM")


def _pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(trident global name, Hub name) for every tensor of a Mixtral export."""
    pairs = [("embedding.weight", "model.embed_tokens.weight")]
    for i in range(cfg.n_layers):
        pairs += [(f"layers.{i}.{ours}", f"model.layers.{i}.{theirs}") for ours, theirs in _ATTENTION]
        for e in range(cfg.moe_experts):
            pairs += [(f"layers.{i}.mlp.experts.{e}.{ours}.weight",
                       f"model.layers.{i}.block_sparse_moe.experts.{e}.{theirs}.weight") for ours, theirs in _EXPERT]
    pairs.append(("final_norm.weight", "model.norm.weight"))
    if not cfg.tie_embeddings:
        pairs.append(("head.weight", "lm_head.weight"))
    return pairs


def to_mixtral(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {theirs: need(tensors, ours) for ours, theirs in _pairs(cfg)}


def _unfuse(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's fused in-memory expert layout, rewritten to the Hub names."""
    out = dict(hf)
    f = cfg.moe_ffn
    for i in range(cfg.n_layers):
        prefix = f"model.layers.{i}"
        if f"{prefix}.mlp.gate.weight" in out:
            out[f"{prefix}.block_sparse_moe.gate.weight"] = out.pop(f"{prefix}.mlp.gate.weight")
        gate_up = out.pop(f"{prefix}.mlp.experts.gate_up_proj", None)  # [E, 2f, h]
        down = out.pop(f"{prefix}.mlp.experts.down_proj", None)  # [E, h, f]
        for e in range(cfg.moe_experts):
            hub = f"{prefix}.block_sparse_moe.experts.{e}"
            if gate_up is not None:
                out[f"{hub}.w1.weight"], out[f"{hub}.w3.weight"] = gate_up[e, :f], gate_up[e, f:]
            if down is not None:
                out[f"{hub}.w2.weight"] = down[e]
    return out


def from_mixtral(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    hf = _unfuse(cfg, hf)
    return {ours: need(hf, theirs) for ours, theirs in _pairs(cfg)}


# --- config.json -------------------------------------------------------------------------------
def mixtral_config(cfg: ModelConfig) -> dict:
    """The architecture's own config.json fields (`trident.checkpoint.hf` adds the shared ones)."""
    check_mixtral(cfg)
    fields = {k: v for k, v in llama_config(cfg).items() if k not in ("attention_bias", "mlp_bias")}
    return {
        **fields,
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "intermediate_size": cfg.moe_ffn,
        "num_local_experts": cfg.moe_experts,
        "num_experts_per_tok": cfg.moe_top_k,
        "router_aux_loss_coef": cfg.moe_aux_loss_coef,
        "output_router_logits": False,
        "router_jitter_noise": 0.0,
        "sliding_window": None,
    }


def config_from_mixtral(hf: dict) -> ModelConfig:
    window, seq = hf.get("sliding_window"), int(hf.get("max_position_embeddings", 2048))
    if window is not None and int(window) < seq:
        raise UserError(
            f"cannot import: Mixtral sliding_window={window} is shorter than max_position_embeddings={seq}; "
            "trident has no sliding-window attention"
        )
    if float(hf.get("router_jitter_noise", 0.0) or 0.0) != 0.0:
        raise UserError("cannot import: router_jitter_noise is not implemented in trident; set it to 0")
    base = config_from_llama({**hf, "attention_bias": False, "mlp_bias": False})
    return dataclasses.replace(
        base,
        moe_experts=int(hf["num_local_experts"]),
        moe_top_k=int(hf["num_experts_per_tok"]),
        moe_ffn_hidden=int(hf["intermediate_size"]),
        moe_router="softmax",
        moe_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0)),
    ).validate()
