"""Reading a checkpoint outside training: inspection, export, generation.

These readers run in one process with no process groups, at whatever layout the
checkpoint was saved: whole tensors reassembled from their slices, the model config and
the tokenizer the run recorded, and a summary for `trident checkpoint inspect`. The
training-time loaders, which read only each rank's share, are in
`trident.checkpoint.checkpoint`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open

from trident.checkpoint.state import CheckpointCorruptError, RunState, as_state, read_state
from trident.checkpoint.store import model_index, verify
from trident.model.config import ModelConfig


@dataclass
class Inspection:
    state: RunState
    tensors: dict[str, tuple[list[int], int]]  # global name -> (global shape, stored bytes)


def inspect_checkpoint(ckpt: str | Path) -> Inspection:
    """Metadata, verified checksums, and the global tensors with their shapes and bytes."""
    ckpt = Path(ckpt)
    state = verify(ckpt)
    tensors: dict[str, tuple[list[int], int]] = {}
    for gname, entries in model_index(ckpt).items():
        nbytes = 0
        for path, info in entries:
            with safe_open(str(path), framework="pt") as f:
                t = f.get_slice(gname)
                shape = t.get_shape()
                nbytes += int(torch.Size(shape).numel()) * torch.empty((), dtype=_dtype(t.get_dtype())).element_size()
        tensors[gname] = (entries[0][1]["global_shape"], nbytes)
    return Inspection(state=state, tensors=tensors)


def _dtype(name: str) -> torch.dtype:
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}.get(name, torch.float32)


def full_tensors(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """Every global model tensor of a checkpoint, whole, reassembled from the slices of
    whatever (tp, pp) layout wrote it, in the stored dtype (one process, no groups)."""
    ckpt = Path(ckpt)
    out: dict[str, torch.Tensor] = {}
    for gname, entries in model_index(ckpt).items():
        covered = 0
        for path, info in entries:
            with safe_open(str(path), framework="pt") as f:
                part = f.get_tensor(gname)
            if gname not in out:
                out[gname] = torch.empty(info["global_shape"], dtype=part.dtype)
            out[gname].narrow(info["dim"], info["start"], info["length"]).copy_(part)
            covered += info["length"]
        if covered != out[gname].shape[entries[0][1]["dim"]]:
            raise CheckpointCorruptError(f"checkpoint {str(ckpt)!r} covers {covered} rows of {gname!r}, not all of it")
    return out


def find_tokenizer(ckpt: str | Path, meta: RunState | Mapping[str, Any] | None = None) -> Path | None:
    """The tokenizer a checkpoint was trained with, or None when it cannot be found.

    The run records the path it used (``tokenizer`` in meta.json, else the config's
    ``data.tokenizer``), often relative to where training ran; so that path is tried as
    given, then relative to the checkpoint, its checkpoints folder and its run folder,
    and finally a ``tokenizer.model``/``tokenizer.json`` lying in one of those folders.
    """
    ckpt = Path(ckpt)
    state = as_state(meta) if meta is not None else read_state(ckpt)
    folders = [ckpt, ckpt.parent, ckpt.parent.parent]
    candidates: list[Path] = []
    for name in state.recorded_tokenizers():
        p = Path(name)
        candidates += [p] if p.is_absolute() else [p] + [folder / p for folder in folders]
    candidates += [folder / f for folder in folders for f in ("tokenizer.model", "tokenizer.json")]
    return next((c for c in candidates if c.exists()), None)


def model_config(meta: RunState | Mapping[str, Any]) -> ModelConfig:
    """The `ModelConfig` a checkpoint was saved with (``config.model`` of its meta.json)."""
    return as_state(meta).model_config()
