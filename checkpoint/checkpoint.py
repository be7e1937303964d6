"""Saving and loading checkpoints during training: safetensors + JSON, no pickle.

Layout of one checkpoint, ``RUN_DIR/checkpoints/step_0000100/``::

    meta.json                      the run's `RunState` (trident.checkpoint.state): step,
                                   consumed samples, config, layout, scheduler, loss scaler,
                                   early-stopping state, sha256 of every file
    model_pp{P}_tp{T}.safetensors  this (pp, tp) position's slices of the global tensors
    optim_rank{R}.safetensors      rank R's optimizer state (fp32 master, exp_avg, exp_avg_sq)
    rng_rank{R}.safetensors        rank R's RNG states (dropout streams, torch default)

Every tensor is stored under its *global* name with the slice of the global tensor it
holds (safetensors metadata, JSON): a model file records ``{name: {dim, start, length,
global_shape}}``; an optimizer file carries the optimizer's own entries (which flat
elements of which global tensor). Replicated values are written once (tp rank 0, dp rank
0, the first kv-head replica; the last stage's copy of a tied embedding not at all).

Crash safety: all ranks write into ``step_N.tmp/``; after a barrier rank 0 writes
meta.json (with the checksums each rank reported), renames the folder to ``step_N``,
then replaces ``latest`` -- so ``latest`` only ever names a complete checkpoint, and a
crash at any moment leaves the previous one intact. Older checkpoints beyond `keep` are
deleted only after that.

Loading reads, for each local parameter piece and each local optimizer entry, only the
overlapping regions of the stored slices and entries (safetensors' lazy `get_slice`), so a
checkpoint saved at one (tp, pp, dp, zero) loads at any other, each rank reading about its
own share.

This module is the collective part, called by every rank. It also re-exports the rest of
the package's API (the format, finding and verifying, offline readers) so that
``from trident.checkpoint import checkpoint as ckpt`` reaches all of it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from trident.checkpoint.offline import Inspection, find_tokenizer, full_tensors, inspect_checkpoint, model_config
from trident.checkpoint.state import (
    FORMAT,
    CheckpointCorruptError,
    EarlyStopping,
    Layout,
    RunState,
    read_meta,
    read_state,
)
from trident.checkpoint.store import (
    LATEST,
    complete_checkpoints,
    find_checkpoint,
    latest_valid,
    model_index,
    sha256_file,
    step_dir_name,
    step_of,
    verify,
)
from trident.errors import UserError
from trident.parallel.collectives import any_rank
from trident.parallel.random import RNGStreams
from trident.parallel.tensor.sharding import iter_pieces, tp_replicas
from trident.parallel.topology import Topology
from trident.parallel.zero.clip import default_exclude

__all__ = [
    "FORMAT", "LATEST", "CheckpointCorruptError", "EarlyStopping", "Inspection", "Layout", "RunState",
    "complete_checkpoints", "find_checkpoint", "find_tokenizer", "full_tensors", "inspect_checkpoint",
    "latest_valid", "load_model", "load_optimizer", "load_rng", "model_config", "read_meta", "read_state",
    "save_checkpoint", "sha256_file", "step_dir_name", "step_of", "verify",
]


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _barrier(topo: Topology) -> None:
    if topo.world > 1:
        dist.barrier()


# --- saving -----------------------------------------------------------------------------------
def _model_slices(model: nn.Module, topo: Topology) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The tensors this (pp, tp) position writes, keyed by global name, and their slices."""
    tensors: dict[str, torch.Tensor] = {}
    slices: dict[str, dict] = {}
    for name, param, gname, piece in iter_pieces(model):
        if default_exclude(name, param) or piece.length == 0:
            continue
        replicas = tp_replicas(piece, topo.tp)
        if topo.tp_rank % replicas != 0:  # another tp rank holds the same values
            continue
        tensors[gname] = param.detach().narrow(piece.dim, piece.local_start, piece.length).cpu().contiguous()
        slices[gname] = {"dim": piece.dim, "start": piece.start, "length": piece.length,
                         "global_shape": list(piece.global_shape)}
    return tensors, slices


def save_checkpoint(
    root: str | Path,
    step: int,
    topo: Topology,
    model: nn.Module,
    optimizer: Any,
    rng: RNGStreams | None,
    state: RunState,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` under `root` (collective: every rank calls it).

    `state` is the rest of the run (consumed samples, scheduler, config, ...); its `step`,
    `layout` and `files` are filled here.
    """
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / (step_dir_name(step) + ".tmp")
    if topo.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a crash while saving
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier(topo)
    failure = None
    try:
        _write_json_atomic(tmp / f"manifest_rank{topo.rank}.json", _write_rank_files(tmp, topo, model, optimizer, rng))
    except (OSError, SafetensorError) as err:  # a full disk, a quota, a vanished mount: a sentence
        failure = _write_failure(err, tmp, topo, step, _state_bytes(model, optimizer))
    if any_rank(failure is not None, topo):  # every rank learns of it (none waits in a barrier)
        if topo.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays; `latest` is untouched
        _barrier(topo)
        raise UserError(failure or f"saving checkpoint {final.name} failed on another rank (its message names "
                        f"the file); {tmp} was removed and the previous checkpoint stays the latest")
    if topo.rank == 0:
        layout = Layout(tp=topo.tp, pp=topo.pp, dp=topo.dp, world=topo.world, zero=optimizer.cfg.zero)
        files = _collect_manifests(tmp, topo.world)
        meta = dataclasses.replace(state, step=step, layout=layout, files=files)
        _write_json_atomic(tmp / "meta.json", meta.to_dict())
        replaced = root / (final.name + ".replaced.tmp")  # a .tmp name: never taken as complete
        if final.exists():  # the same step saved again: move the old copy aside, delete it last
            os.replace(final, replaced)
        os.replace(tmp, final)
        _write_json_atomic(root / LATEST, {"step": step, "dir": final.name})
        shutil.rmtree(replaced, ignore_errors=True)
        _prune(root, keep)
    _barrier(topo)
    return final


def _state_bytes(model: nn.Module, optimizer: Any) -> int:
    """About what one rank writes: its parameters and its optimizer state."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return params + (optimizer.memory().get("optimizer_bytes", 0) if hasattr(optimizer, "memory") else 0)


def _write_failure(err: Exception, tmp: Path, topo: Topology, step: int, need: int) -> str:
    """One sentence: which rank, which file, why, and the space there against what this
    rank writes."""
    def size(n: float) -> str:
        return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"

    try:
        free = f"; {size(shutil.disk_usage(tmp.parent).free)} free there"
    except OSError:
        free = ""
    what = f"{err.strerror} writing {err.filename or tmp}" if isinstance(err, OSError) else f"{err} in {tmp}"
    return (f"saving checkpoint step {step} failed on rank {topo.rank}: {what}{free}, and this rank writes about "
            f"{size(need)} (parameters + optimizer state); {tmp} was removed and the previous checkpoint "
            f"stays the latest")


def _write_rank_files(
    tmp: Path, topo: Topology, model: nn.Module, optimizer: Any, rng: RNGStreams | None
) -> dict[str, str]:
    """Write this rank's model slices, optimizer state and RNG states; file name -> sha256."""
    written: dict[str, str] = {}

    def put(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str]) -> None:
        path = tmp / filename
        save_file(tensors, str(path), metadata=metadata)
        written[filename] = sha256_file(path)

    if topo.dp_cp_rank == 0:  # one writer per (pp, tp) slice: dp and cp replicas hold the same weights
        tensors, slices = _model_slices(model, topo)
        put(tensors, f"model_pp{topo.pp_rank}_tp{topo.tp_rank}.safetensors", {"slices": json.dumps(slices)})
    opt_state = optimizer.state_dict()
    # zero 0 keeps a full replica of the state on every dp rank: store it once
    if optimizer.cfg.zero > 0 or topo.dp_cp_rank == 0:
        put(opt_state["tensors"], f"optim_rank{topo.rank}.safetensors", {"meta": json.dumps(opt_state["meta"])})
    rng_tensors = {"torch_cpu": torch.get_rng_state()}
    if topo.device.type == "cuda":
        rng_tensors["torch_cuda"] = torch.cuda.get_rng_state(topo.device)
    if rng is not None:
        rng_tensors.update({f"stream/{k}": v.cpu() for k, v in rng.state_dict().items()})
    put(rng_tensors, f"rng_rank{topo.rank}.safetensors", {})
    return written


def _collect_manifests(tmp: Path, world: int) -> dict[str, str]:
    """Every rank's reported file checksums, merged; the manifests are removed."""
    files: dict[str, str] = {}
    for r in range(world):
        manifest = tmp / f"manifest_rank{r}.json"
        files.update(json.loads(manifest.read_text()))
        manifest.unlink()
    return files


def _prune(root: Path, keep: int) -> None:
    """Delete complete checkpoints beyond the newest `keep` (never the one `latest` names),
    and what earlier crashed saves left (`step_*.tmp`: only one save runs at a time)."""
    for stale in root.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep <= 0:
        return
    complete = sorted(complete_checkpoints(root), key=step_of)
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# --- loading ------------------------------------------------------------------------------
@torch.no_grad()
def load_model(ckpt: str | Path, model: nn.Module) -> None:
    """Fill this rank's parameters from a checkpoint saved at any layout, reading only the
    regions of the stored slices that overlap this rank's pieces."""
    ckpt = Path(ckpt)
    index = model_index(ckpt)
    for name, param, gname, piece in iter_pieces(model):
        if piece.length == 0:
            continue
        if gname not in index:
            raise CheckpointCorruptError(f"checkpoint {str(ckpt)!r} holds no tensor {gname!r} (needed for {name})")
        need_lo, need_hi = piece.start, piece.start + piece.length
        covered = 0
        for path, info in index[gname]:
            if info["dim"] != piece.dim:
                raise CheckpointCorruptError(f"{gname!r} is sliced along dim {info['dim']} in {path.name}, not {piece.dim}")
            lo, hi = max(need_lo, info["start"]), min(need_hi, info["start"] + info["length"])
            if lo >= hi:
                continue
            with safe_open(str(path), framework="pt") as f:
                view = f.get_slice(gname)
                index_expr = [slice(None)] * len(info["global_shape"])
                index_expr[info["dim"]] = slice(lo - info["start"], hi - info["start"])
                values = view[tuple(index_expr)]
            dst = param.narrow(piece.dim, piece.local_start + lo - piece.start, hi - lo)
            dst.copy_(values.to(dst.dtype))
            covered += hi - lo
        if covered < piece.length:
            raise CheckpointCorruptError(f"checkpoint {str(ckpt)!r} covers only {covered} of {piece.length} rows of {gname!r}")


def load_optimizer(ckpt: str | Path, optimizer: Any) -> None:
    """Load this rank's optimizer state from a checkpoint saved at any layout, reading only
    the stored ranges that overlap the elements it owns.

    Every saved rank's file is opened lazily (`safe_open`) and only its metadata is read up
    front (which elements of which global tensor each entry holds); the optimizer then
    reads through ``get_slice`` just the parts of the entries it needs, so a rank reads about
    its own share of the state at any layout instead of every rank's files whole.
    """
    paths = sorted(Path(ckpt).glob("optim_rank*.safetensors"))
    if not paths:
        raise CheckpointCorruptError(f"checkpoint {str(ckpt)!r} holds no optimizer state")
    with ExitStack() as files:
        states = []
        for path in paths:
            f = files.enter_context(safe_open(str(path), framework="pt"))
            states.append({"tensors": f, "meta": json.loads(f.metadata()["meta"])})
        optimizer.load_state_dict(states)


def load_rng(ckpt: str | Path, topo: Topology, rng: RNGStreams | None, same_layout: bool) -> bool:
    """Restore this rank's RNG states when the layout is unchanged; returns whether it did.

    At another layout the ranks are different processes with different streams, so the
    streams keep their fresh seeding (dropout masks then differ from the saved run's).
    """
    if not same_layout:
        return False
    tensors = load_file(str(Path(ckpt) / f"rng_rank{topo.rank}.safetensors"))
    torch.set_rng_state(tensors["torch_cpu"])
    if topo.device.type == "cuda" and "torch_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["torch_cuda"], topo.device)
    if rng is not None:
        rng.load_state_dict({k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("stream/")})
    return True
