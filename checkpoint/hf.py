"""Hugging Face export and import: trident's full global tensors <-> Llama and GPT-2 folders.

Pure conversion, no processes: the caller gathers a model (`gather_full`) or reads a
checkpoint (`trident.checkpoint.checkpoint.full_tensors`) into whole tensors by global
name and hands them here with the `ModelConfig`; import gives back the same pair, which
`load_full` slices onto any layout.

Two architectures cover what trident builds that the ecosystem can run:

* **Llama** (`LlamaForCausalLM`): RMSNorm, RoPE, SwiGLU, any number of kv heads, tied
  or untied head, optional biases (Llama's ``attention_bias``/``mlp_bias``). trident's
  RoPE is already HF's rotate-half layout, so q and k rows map one to one, with no
  permutation (Meta's original checkpoints interleave and need one; HF's do not).
* **GPT-2** (`GPT2LMHeadModel`): LayerNorm, learned positions, tanh-GeLU, full
  multi-head attention. Its linears are `Conv1D`s holding ``[in, out]`` weights, the
  transpose of ``nn.Linear``, and q, k, v are one fused ``c_attn``.

Anything else (ALiBi, post-norm, QK-norm, no positions, mixed combinations such as RoPE
with GeLU) has no HF architecture that computes the same function, and is refused with
a `UserError` naming the feature rather than written as a folder that loads but
computes something else.

The tokenizer travels too (`trident.data.hf_tokenizer`), so `AutoTokenizer` loads
the same folder. `trident.checkpoint.hf_checkpoint` connects both directions to trident
checkpoints.

Only safetensors and JSON are read and written; nothing is pickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trident.errors import UserError
from trident.model.config import ModelConfig
from trident.model.gpt import GPT
from trident.parallel.tensor.sharding import global_shapes
from trident.parallel.topology import Topology
from trident.data.hf_tokenizer import export_tokenizer

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' own default for save_pretrained
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


# --- which architecture -----------------------------------------------------------------------
def hf_architecture(cfg: ModelConfig) -> str:
    """``"llama"`` or ``"gpt2"``: the HF architecture that computes exactly this model.

    Raises a `UserError` naming the first feature that no HF architecture expresses.
    """
    cfg.validate()

    def refuse(feature: str) -> UserError:
        return UserError(
            f"cannot export to Hugging Face: {feature} has no equivalent in Llama or GPT-2; "
            "Llama needs RMSNorm + RoPE + SwiGLU, GPT-2 needs LayerNorm + learned positions + GeLU, both pre-norm"
        )

    if cfg.norm_position != "pre":
        raise refuse(f"post-norm (model.norm_position={cfg.norm_position!r})")
    if cfg.qk_norm:
        raise refuse("QK-norm (model.qk_norm=true)")
    if cfg.position == "alibi":
        raise refuse("ALiBi positions (model.position='alibi')")
    if cfg.position == "none":
        raise refuse("a model without position encoding (model.position='none')")
    if cfg.position == "rope":
        if cfg.activation != "swiglu":
            raise refuse(f"RoPE with {cfg.activation} (model.activation={cfg.activation!r})")
        if cfg.norm != "rmsnorm":
            raise refuse(f"RoPE with LayerNorm (model.norm={cfg.norm!r})")
        return "llama"
    # learned positions: GPT-2
    if cfg.norm != "layernorm":
        raise refuse(f"learned positions with RMSNorm (model.norm={cfg.norm!r})")
    if cfg.activation != "gelu":
        raise refuse(f"learned positions with SwiGLU (model.activation={cfg.activation!r})")
    if cfg.kv_heads != cfg.n_heads:
        raise refuse(
            f"grouped-query attention with learned positions (model.n_kv_heads={cfg.kv_heads} < n_heads={cfg.n_heads})"
        )
    return "gpt2"


# --- tensor name tables ------------------------------------------------------------------------
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
# GPT-2's Conv1D linears: (trident linear, GPT-2 module); weights are transposed.
_GPT2_LINEARS = [("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")]
_GPT2_NORMS = [("norm1", "ln_1"), ("norm2", "ln_2")]


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


def _need(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise UserError(f"tensor {name!r} is missing from the weights being converted")
    return tensors[name]


def to_llama(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {theirs: _need(tensors, ours) for ours, theirs in _llama_pairs(cfg)}


def from_llama(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {ours: _need(hf, theirs) for ours, theirs in _llama_pairs(cfg)}


def to_gpt2(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT-2 tensors; a bias-free trident model gets zero biases (GPT-2 always has them),
    which computes the same function."""
    t = lambda name: _need(tensors, name)  # noqa: E731

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
        return _need(hf, name.removeprefix("transformer."))

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
        out["head.weight"] = _need(hf, "lm_head.weight")
    return out


# --- configs -----------------------------------------------------------------------------------
def llama_config(cfg: ModelConfig, specials: dict[str, int | None]) -> dict:
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
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": specials.get("bos"),
        "eos_token_id": specials.get("eos"),
        "pad_token_id": specials.get("pad"),
        "use_cache": True,
    }


def gpt2_config(cfg: ModelConfig, specials: dict[str, int | None]) -> dict:
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
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": specials.get("bos"),
        "eos_token_id": specials.get("eos"),
        "pad_token_id": specials.get("pad"),
        "use_cache": True,
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


# --- safetensors files ----------------------------------------------------------------------------
def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Names grouped into files of at most `max_shard_bytes`, in order (a tensor larger than
    the limit gets a file of its own, as transformers does)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = _nbytes(t)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def write_safetensors(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> list[str]:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` files and their index."""
    for stale in list(out_dir.glob("model*.safetensors")) + [out_dir / INDEX_NAME]:
        stale.unlink(missing_ok=True)  # an earlier export's shards would confuse loaders
    # safetensors refuses views sharing storage; every tensor gets its own contiguous copy
    tensors = {n: t.detach().contiguous().clone() for n, t in tensors.items()}
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    shards = plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(tensors, str(out_dir / WEIGHTS_NAME), metadata=meta)
        return [WEIGHTS_NAME]
    files, weight_map = [], {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(out_dir / fname), metadata=meta)
        weight_map.update({n: fname for n in names})
        files.append(fname)
    index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())}, "weight_map": weight_map}
    _write_json(out_dir / INDEX_NAME, index)
    return files + [INDEX_NAME]


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a HF folder (single file or sharded with an index), as fp32."""
    index = folder / INDEX_NAME
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = (
            f"; {', '.join(pickled)} are pickle files, which trident never loads: re-save with "
            "save_pretrained(..., safe_serialization=True)"
            if pickled
            else ""
        )
        raise UserError(f"{folder} holds neither {WEIGHTS_NAME} nor {INDEX_NAME}{hint}")
    out: dict[str, torch.Tensor] = {}
    for fname in files:
        with safe_open(str(folder / fname), framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name).float()
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


# --- the two entry points ----------------------------------------------------------------------------
_TO_HF: dict[str, tuple[Callable, Callable]] = {"llama": (to_llama, llama_config), "gpt2": (to_gpt2, gpt2_config)}


def export_hf(
    cfg: ModelConfig,
    tensors: dict[str, torch.Tensor],
    out_dir: str | os.PathLike,
    tokenizer_path: str | os.PathLike | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a folder that ``AutoModelForCausalLM.from_pretrained`` loads as Llama or GPT-2.

    `tensors` are trident's whole global tensors (unpadded vocabulary). Files:
    ``config.json``, ``generation_config.json``, the weights (``model.safetensors``, or
    shards of at most `max_shard_bytes` plus ``model.safetensors.index.json``), and with
    `tokenizer_path` the tokenizer files. `dtype` defaults to that of the embedding.
    Raises `UserError` before writing anything when the config has no HF equivalent.
    """
    arch = hf_architecture(cfg)
    convert, make_config = _TO_HF[arch]
    check_shapes(cfg, tensors, "the weights being exported")
    dtype = dtype if dtype is not None else tensors["embedding.weight"].dtype
    hf_tensors = {name: t.to(dtype) for name, t in convert(cfg, tensors).items()}
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {str(out)!r} is a file; give a folder (it is created when missing)")
    out.mkdir(parents=True, exist_ok=True)
    specials: dict[str, int | None] = {}
    if tokenizer_path is not None:
        specials = export_tokenizer(str(tokenizer_path), out, cfg.max_seq_len)
        # a special id outside the model's vocabulary would make transformers complain
        specials = {k: (i if i is not None and i < cfg.vocab_size else None) for k, i in specials.items()}
    config = make_config(cfg, specials)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    _write_json(out / "config.json", config)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
    _write_json(out / "generation_config.json", generation)
    write_safetensors(hf_tensors, out, max_shard_bytes)
    return out


def check_shapes(cfg: ModelConfig, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Every global tensor that `cfg` needs is present with its shape, or a `UserError`.

    The expected names and shapes come from the model itself, built on the meta device
    (no memory), so this check cannot drift from the model code.
    """
    expected = global_shapes(GPT(cfg, Topology.single(), device="meta"))
    for name, shape in expected.items():
        if name not in tensors:
            raise UserError(f"{what} lack the tensor {name!r} that this config needs")
        if tuple(tensors[name].shape) != tuple(shape):
            raise UserError(
                f"{what}: {name!r} has shape {tuple(tensors[name].shape)}, but the config implies {tuple(shape)}"
            )


def import_hf(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A HF Llama or GPT-2 folder as a trident config and whole fp32 global tensors.

    The tensors load onto any layout with `trident.parallel.tensor.sharding.load_full`, or go
    into a checkpoint with `trident.checkpoint.hf_checkpoint.import_checkpoint`.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"Hugging Face model folder {str(folder)!r} does not exist")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{str(folder)!r} is not a Hugging Face model folder: it has no config.json")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{str(config_path)!r} is not valid JSON ({err.msg})") from None
    kind = hf.get("model_type")
    if kind == "llama":
        cfg = config_from_llama(hf)
        tensors = from_llama(cfg, read_safetensors(folder))
    elif kind == "gpt2":
        cfg = config_from_gpt2(hf)
        tensors = from_gpt2(cfg, read_safetensors(folder))
    else:
        raise UserError(f"cannot import Hugging Face model_type {kind!r} from {str(folder)!r}; supported are llama and gpt2")
    check_shapes(cfg, tensors, f"the weights in {str(folder)!r}")
    return cfg, tensors


__all__ = ["export_hf", "import_hf", "hf_architecture", "check_shapes"]
