"""Hugging Face export and import: trident's full global tensors <-> Llama and GPT-2 folders.

Pure conversion, no processes: the caller gathers a model (`gather_full`) or reads a
checkpoint (`trident.checkpoint.checkpoint.full_tensors`) into whole tensors by global
name and hands them here with the `ModelConfig`; import gives back the same pair, which
`load_full` slices onto any layout.

Two architectures cover what trident builds that the ecosystem can run, each mapped in
its own module: **Llama** (`LlamaForCausalLM`, `trident.checkpoint.hf_llama`: RMSNorm,
RoPE, SwiGLU, any number of kv heads) and **GPT-2** (`GPT2LMHeadModel`,
`trident.checkpoint.hf_gpt2`: LayerNorm, learned positions, tanh-GeLU, full multi-head
attention). The folder's weight files are read and written by `trident.checkpoint.hf_files`.
This module decides which architecture a config is, and runs the two directions.

Anything else (ALiBi, post-norm, QK-norm, no positions, mixed combinations such as RoPE
with GeLU) has no HF architecture that computes the same function, and is refused with
a `UserError` naming the feature rather than written as a folder that loads but
computes something else.

The tokenizer travels too (`trident.data.hf_tokenizer`), so `AutoTokenizer` loads
the same folder. `trident.checkpoint.hf_checkpoint` connects both directions to trident
checkpoints. Only safetensors and JSON are read and written; nothing is pickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch

from trident.checkpoint.hf_files import DEFAULT_MAX_SHARD_BYTES, read_safetensors, write_json, write_safetensors
from trident.checkpoint.hf_gpt2 import config_from_gpt2, from_gpt2, gpt2_config, to_gpt2
from trident.checkpoint.hf_llama import config_from_llama, from_llama, llama_config, to_llama
from trident.checkpoint.hf_mixtral import check_mixtral, config_from_mixtral, from_mixtral, mixtral_config, to_mixtral
from trident.data.hf_tokenizer import export_tokenizer
from trident.errors import UserError
from trident.model.config import ModelConfig
from trident.model.gpt import GPT
from trident.parallel.tensor.sharding import global_shapes
from trident.parallel.topology import Topology


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
        if cfg.moe_experts > 0:  # Llama with sparse MoE blocks
            check_mixtral(cfg)
            return "mixtral"
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


# --- the two entry points ----------------------------------------------------------------------------
_TO_HF: dict[str, tuple[Callable, Callable]] = {
    "llama": (to_llama, llama_config), "gpt2": (to_gpt2, gpt2_config), "mixtral": (to_mixtral, mixtral_config),
}


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
    config = {**make_config(cfg), **_shared_config(cfg, specials, dtype)}
    write_json(out / "config.json", config)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
    write_json(out / "generation_config.json", generation)
    write_safetensors(hf_tensors, out, max_shard_bytes)
    return out


def _shared_config(cfg: ModelConfig, specials: dict[str, int | None], dtype: torch.dtype) -> dict:
    """The config.json fields Llama and GPT-2 name alike."""
    return {
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": specials.get("bos"),
        "eos_token_id": specials.get("eos"),
        "pad_token_id": specials.get("pad"),
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


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
    elif kind == "mixtral":
        cfg = config_from_mixtral(hf)
        tensors = from_mixtral(cfg, read_safetensors(folder))
    else:
        raise UserError(
            f"cannot import Hugging Face model_type {kind!r} from {str(folder)!r}; supported are llama, mixtral and gpt2"
        )
    check_shapes(cfg, tensors, f"the weights in {str(folder)!r}")
    return cfg, tensors


# DEFAULT_MAX_SHARD_BYTES and read_safetensors live in trident.checkpoint.hf_files; they are
# named here for trident.checkpoint.hf_checkpoint and tests/test_hf.py
