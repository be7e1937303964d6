"""The files of a Hugging Face model folder: safetensors weights and JSON.

Weights are one ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards of
at most a given size plus ``model.safetensors.index.json`` (transformers' layout, which
``from_pretrained`` loads). Only safetensors and JSON are read and written; a folder
holding only pickle files (``*.bin``, ``*.pt``) is refused with the command that re-saves
it. `need` is the lookup the architecture tables share, so that a tensor missing from
a folder is named rather than raised as a bare KeyError.

Kept apart from the name tables (`trident.checkpoint.hf_llama`, `hf_gpt2`) because it
knows nothing of architectures: it moves named tensors to and from disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trident.errors import UserError

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' own default for save_pretrained
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def need(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """`tensors[name]`, or a `UserError` naming the missing tensor."""
    if name not in tensors:
        raise UserError(f"tensor {name!r} is missing from the weights being converted")
    return tensors[name]


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
    write_json(out_dir / INDEX_NAME, index)
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


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
