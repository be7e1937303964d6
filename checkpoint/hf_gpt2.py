"""The GPT-2 mapping (`GPT2LMHeadModel`): tensor names, layouts and config.json, both directions.

LayerNorm, learned positions, tanh-GeLU, full multi-head attention. Its linears are
`Conv1D`s holding ``[in, out]`` weights, the transpose of ``nn.Linear``, and q, k, v are
one fused ``c_attn``, so unlike Llama the mapping splits, fuses and transposes tensors.
GPT-2 always has biases; a bias-free trident model exports zero biases, which compute
the same function.

One file per architecture, so that adding one (or reading how one maps) touches no
file I/O; `trident.checkpoint.hf` chooses the architecture and writes the folder.
"""

from __future__ import annotations

import torch

from trident.checkpoint.hf_files import need
from trident.errors import UserError
from trident.model.config import ModelConfig

# GPT-2's Conv1D linears: (trident linear, GPT-2 module); weights are transposed.
_GPT2_LINEARS = [("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")]
_GPT2_NORMS = [("norm1", "ln_1"), ("norm2", "ln_2")]


def to_gpt2(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT-2 tensors; a bias-free trident model gets zero biases (GPT-2 always has them),
    which computes the same function."""
    t = lambda name: need(tensors, name)  # noqa: E731

    def bias(name: str, size: int) -> torch.Tensor:
        return t(name) if cfg.bias else torch.zeros(size, dtype=t("embedding.weight").dtype)

    h = cfg.hidden
    out = {"transformer.wte.weight": t("embedding.weight"), "transformer.wpe.weight": t("pos_embedding")}
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.", f"transformer.h.{i}."
        for norm, ln in _GPT2_NORMS:
            out[f"{theirs}{ln}.weight"] = t(f"{ours}{norm}.weight")
            out[f"{theirs}{ln}.bias"] = bias(f"{ours}{norm}.bias", h)
        qkv = [t(f"{ours}attn.qkv.{p}.weight") for p in "qkv"]  # 3 x [h, h] as [out, in]
        out[f"{theirs}attn.c_attn.weight"] = torch.cat(qkv, 0).t().contiguous()  # [h, 3h] as [in, out]
        out[f"{theirs}attn.c_attn.bias"] = torch.cat([bias(f"{ours}attn.qkv.{p}.bias", h) for p in "qkv"])
        for linear, conv in _GPT2_LINEARS:
            w = t(f"{ours}{linear}.weight")  # [out, in]
            out[f"{theirs}{conv}.weight"] = w.t().contiguous()  # [in, out]
            out[f"{theirs}{conv}.bias"] = bias(f"{ours}{linear}.bias", w.shape[0])
    out["transformer.ln_f.weight"] = t("final_norm.weight")
    out["transformer.ln_f.bias"] = bias("final_norm.bias", h)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = t("head.weight")
    return out


def from_gpt2(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """trident tensors from GPT-2 names (with or without the ``transformer.`` prefix)."""
    def t(name: str) -> torch.Tensor:
        if name in hf:
            return hf[name]
        return need(hf, name.removeprefix("transformer."))

    h = cfg.hidden
    out = {"embedding.weight": t("transformer.wte.weight"), "pos_embedding": t("transformer.wpe.weight")}
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.", f"transformer.h.{i}."
        for norm, ln in _GPT2_NORMS:
            out[f"{ours}{norm}.weight"] = t(f"{theirs}{ln}.weight")
            out[f"{ours}{norm}.bias"] = t(f"{theirs}{ln}.bias")
        w = t(f"{theirs}attn.c_attn.weight").t()  # [3h, h] as [out, in]
        b = t(f"{theirs}attn.c_attn.bias")  # [3h]
        for j, p in enumerate("qkv"):
            out[f"{ours}attn.qkv.{p}.weight"] = w[j * h : (j + 1) * h].contiguous()
            out[f"{ours}attn.qkv.{p}.bias"] = b[j * h : (j + 1) * h].clone()
        for linear, conv in _GPT2_LINEARS:
            out[f"{ours}{linear}.weight"] = t(f"{theirs}{conv}.weight").t().contiguous()  # [out, in]
            out[f"{ours}{linear}.bias"] = t(f"{theirs}{conv}.bias")
    out["final_norm.weight"] = t("transformer.ln_f.weight")
    out["final_norm.bias"] = t("transformer.ln_f.bias")
    if not cfg.tie_embeddings:
        out["head.weight"] = need(hf, "lm_head.weight")
    return out


# --- config.json -------------------------------------------------------------------------------
def gpt2_config(cfg: ModelConfig) -> dict:
    """The architecture's own config.json fields (`trident.checkpoint.hf` adds the shared ones)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.hidden,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.ffn,
        "n_positions": cfg.max_seq_len,
        "n_ctx": cfg.max_seq_len,
        "activation_function": "gelu_new",  # the tanh approximation, as trident's GeLU
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.attention_dropout,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
    }


def config_from_gpt2(hf: dict) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise UserError(
            f"cannot import: GPT-2 activation_function={act!r}; trident's GeLU is the tanh approximation "
            "(gelu_new, gelu_pytorch_tanh)"
        )
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        raise UserError("cannot import: GPT-2 attention scaling other than 1/sqrt(head_dim) is not implemented in trident")
    hidden = int(hf.get("n_embd", 768))
    return ModelConfig(
        vocab_size=int(hf.get("vocab_size", 50257)),
        n_layers=int(hf.get("n_layer", 12)),
        hidden=hidden,
        n_heads=int(hf.get("n_head", 12)),
        ffn_hidden=int(hf.get("n_inner") or 4 * hidden),
        max_seq_len=int(hf.get("n_positions", 1024)),
        position="learned",
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        activation="gelu",
        bias=True,
        dropout=float(hf.get("resid_pdrop", 0.0)),
        attention_dropout=float(hf.get("attn_pdrop", 0.0)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        init_std=float(hf.get("initializer_range", 0.02)),
    ).validate()
