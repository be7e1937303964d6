"""The Llama mapping (`LlamaForCausalLM`): tensor names and config.json, both directions.

RMSNorm, RoPE, SwiGLU, any number of kv heads, tied or untied head, optional biases
(Llama's ``attention_bias``/``mlp_bias``). trident's RoPE is already HF's rotate-half
layout, so q and k rows map one to one, with no permutation (Meta's original checkpoints
interleave and need one; HF's do not), and every tensor keeps its shape: the mapping is
a table of names.

One file per architecture, so that adding one (or reading how one maps) touches no
file I/O; `trident.checkpoint.hf` chooses the architecture and writes the folder.
"""

from __future__ import annotations

import torch

from trident.checkpoint.hf_files import need
from trident.errors import UserError
from trident.model.config import ModelConfig

# Per-layer (trident suffix, Llama suffix); biases follow their weights when model.bias is set.
_LLAMA_LAYER = [
    ("norm1.weight", "input_layernorm.weight"),
    ("attn.qkv.q", "self_attn.q_proj"),
    ("attn.qkv.k", "self_attn.k_proj"),
    ("attn.qkv.v", "self_attn.v_proj"),
    ("attn.proj", "self_attn.o_proj"),
    ("norm2.weight", "post_attention_layernorm.weight"),
    ("mlp.fc.gate", "mlp.gate_proj"),
    ("mlp.fc.up", "mlp.up_proj"),
    ("mlp.proj", "mlp.down_proj"),
]


def _llama_pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(trident global name, HF name) for every tensor of a Llama export."""
    pairs = [("embedding.weight", "model.embed_tokens.weight")]
    for i in range(cfg.n_layers):
        for ours, theirs in _LLAMA_LAYER:
            suffixes = [""] if ours.endswith(".weight") else [".weight"] + ([".bias"] if cfg.bias else [])
            pairs += [(f"layers.{i}.{ours}{s}", f"model.layers.{i}.{theirs}{s}") for s in suffixes]
    pairs.append(("final_norm.weight", "model.norm.weight"))
    if not cfg.tie_embeddings:
        pairs.append(("head.weight", "lm_head.weight"))
    return pairs


def to_llama(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {theirs: need(tensors, ours) for ours, theirs in _llama_pairs(cfg)}


def from_llama(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {ours: need(hf, theirs) for ours, theirs in _llama_pairs(cfg)}


# --- config.json -------------------------------------------------------------------------------
def llama_config(cfg: ModelConfig) -> dict:
    """The architecture's own config.json fields (`trident.checkpoint.hf` adds the shared ones)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.ffn,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # transformers < 5 reads rope_theta, >= 5 reads rope_parameters; write both
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": cfg.attention_dropout,
    }


def _rope_theta(hf: dict) -> float:
    """RoPE base from either config generation; scaled RoPE variants are refused."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise UserError(
            f"cannot import: RoPE scaling {kind!r} (rope_parameters/rope_scaling) is not implemented in trident; "
            "only plain RoPE ('default') is"
        )
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta)


def config_from_llama(hf: dict) -> ModelConfig:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"cannot import: Llama hidden_act={act!r}; trident's SwiGLU uses silu")
    attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attn_bias != mlp_bias:
        raise UserError(
            f"cannot import: attention_bias={attn_bias} with mlp_bias={mlp_bias}; trident has one bias switch for all linears"
        )
    hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise UserError(
            f"cannot import: head_dim={head_dim} x num_attention_heads={heads} != hidden_size={hidden}; "
            "trident's head size is hidden / heads"
        )
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        n_layers=int(hf["num_hidden_layers"]),
        hidden=hidden,
        n_heads=heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or heads),
        ffn_hidden=int(hf["intermediate_size"]),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        position="rope",
        rope_theta=_rope_theta(hf),
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        activation="swiglu",
        bias=attn_bias,
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
    ).validate()
