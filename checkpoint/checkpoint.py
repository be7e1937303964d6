"""Saving and loading checkpoints during training: safetensors + JSON, no pickle.

Layout of one checkpoint, ``RUN_DIR/checkpoints/step_0000100/``::

    meta.json                      the run's `RunState` (trident.checkpoint.state): step,
                                   consumed samples, config, layout, scheduler, loss scaler,
                                   early-stopping state, sha256 of every file
    model_pp{P}_tp{T}.safetensors  this (pp, tp) position's slices of the global tensors
    model_pp{P}_tp{T}_ep{E}.safetensors  under expert parallelism, ep rank E's experts (E >= 1;
                                   ep rank 0's are in the file above)
    optim_rank{R}.safetensors      rank R's optimizer state (fp32 master, exp_avg, exp_avg_sq)
    rng_rank{R}.safetensors        rank R's RNG states (dropout streams, torch default)
    index.json                     which slices / optimizer entries each file holds
                                   (trident.checkpoint.index), so a load opens only its files

Every tensor is stored under its *global* name with the slice of the global tensor it
holds (safetensors metadata, JSON): a model file records ``{name: {dim, start, length,
global_shape}}``; an optimizer file carries the optimizer's own entries (which flat
elements of which global tensor). Replicated values are written once (tp rank 0, dp rank
0, the first kv-head replica; the last stage's copy of a tied embedding not at all).

Crash safety: every rank creates ``step_N.tmp/`` itself (exist_ok: another node's mkdir
may not show yet on a shared file system) and writes its files there, each fsynced, then
the folder; after a barrier rank 0 writes index.json and meta.json (with the checksums
each rank reported), renames the folder to ``step_N``, fsyncs the parent, then replaces
``latest`` -- so ``latest`` only ever names a complete, durable checkpoint, and a crash
(or power cut) at any moment leaves the previous one intact. Older checkpoints beyond
`keep` are deleted only after that. A full disk is checked before writing (the whole
checkpoint's bytes against the free space) and caught while writing; either way every
rank ends the save with one sentence, the partial folder removed (`trident.checkpoint.durable`).

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
import errno
import json
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from trident.checkpoint import durable
from trident.checkpoint.index import INDEX, build_index, model_sources, optimizer_files, read_index
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
    sha256_file,
    step_dir_name,
    step_of,
    verify,
)
from trident.errors import UserError
from trident.model.config import ModelConfig
from trident.model.moe import expert_bias_state, load_expert_bias
from trident.parallel.collectives import any_rank, comm_device
from trident.parallel.random import RNGStreams
from trident.parallel.tensor.sharding import is_expert, iter_pieces, tp_replicas
from trident.parallel.topology import Topology
from trident.parallel.zero.clip import default_exclude
from trident.parallel.zero.optimizer_state import local_entries

__all__ = [
    "FORMAT", "LATEST", "CheckpointCorruptError", "EarlyStopping", "Inspection", "Layout", "RunState",
    "complete_checkpoints", "find_checkpoint", "find_tokenizer", "full_tensors", "inspect_checkpoint",
    "checkpoint_index", "latest_valid", "load_model", "load_optimizer", "load_rng", "model_config", "model_reads",
    "optimizer_reads", "read_meta", "read_state",
    "save_checkpoint", "sha256_file", "step_dir_name", "step_of", "verify",
]


def _barrier(topo: Topology) -> None:
    if topo.world > 1:
        dist.barrier()


def _total(n: int, topo: Topology) -> int:
    """The sum of `n` over every rank (what the whole checkpoint needs)."""
    if topo.world == 1 or not dist.is_initialized():
        return n
    t = torch.tensor([n], dtype=torch.float64, device=comm_device(topo))
    dist.all_reduce(t)
    return int(t.item())


# --- saving -----------------------------------------------------------------------------------
def _model_slices(
    model: nn.Module, topo: Topology, experts_only: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The tensors this (pp, tp) position writes, keyed by global name, and their slices
    (`experts_only`: just this rank's experts, under expert parallelism)."""
    tensors: dict[str, torch.Tensor] = {}
    slices: dict[str, dict] = {}
    for name, param, gname, piece in iter_pieces(model):
        if default_exclude(name, param) or piece.length == 0 or (experts_only and not is_expert(param)):
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
    `layout` and `files` are filled here. A rank that cannot write (a full disk, a quota, a
    vanished mount) ends the save on every rank with one sentence; the partial folder is
    removed and `latest` keeps naming the previous checkpoint.
    """
    root = Path(root)
    cfg = getattr(model, "cfg", None)  # the MoE selection bias is no parameter: meta.json carries it (collective)
    if isinstance(cfg, ModelConfig):
        state = dataclasses.replace(state, expert_bias=expert_bias_state(model, cfg, topo))
    final = root / step_dir_name(step)
    tmp = root / (step_dir_name(step) + ".tmp")
    if topo.rank == 0 and tmp.exists():  # left by a crash while saving
        durable.remove_tree(tmp)
    _barrier(topo)
    failure, written, need = None, [], 0
    try:
        tmp.mkdir(parents=True, exist_ok=True)  # every rank its own view: another node's mkdir may not show yet
        files = _rank_files(topo, model, optimizer, rng)
        need = sum(durable.tensor_file_bytes(*v) for v in files.values())
    except OSError as err:
        failure = err
    total = _total(need, topo)
    free = durable.free_bytes(root)
    # refuse before writing gigabytes that cannot fit (0 free may be a file system that cannot tell: try)
    if failure is None and 0 < free < total:
        failure = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
    if failure is None:
        try:
            manifest = _write_rank_files(tmp, files, written)
            written.append(tmp / f"manifest_rank{topo.rank}.json")
            durable.write_json(written[-1], manifest)
        except OSError as err:
            failure = err
    if any_rank(failure is not None, topo):  # every rank learns of it (none waits in a barrier)
        _discard(tmp, written, topo)
        raise UserError(_write_failure(failure, tmp, topo, step, total, written))
    if topo.rank == 0:
        _publish(root, tmp, final, topo, optimizer, state, step)
        _prune(root, keep)
    _barrier(topo)
    return final


def _publish(root: Path, tmp: Path, final: Path, topo: Topology, optimizer: Any, state: RunState, step: int) -> None:
    """Rank 0, once every rank's files are durable: the index, meta.json, the rename, `latest`
    -- each fsynced before the next step, so `latest` never names a folder a power cut
    could leave incomplete."""
    layout = Layout(tp=topo.tp, pp=topo.pp, dp=topo.dp, world=topo.world, zero=optimizer.cfg.zero, ep=topo.ep)
    manifests = _collect_manifests(tmp, topo.world)
    files = {name: digest for m in manifests for name, digest in m["files"].items()}
    durable.write_json(tmp / INDEX, build_index(manifests), indent=None)
    files[INDEX] = sha256_file(tmp / INDEX)
    meta = dataclasses.replace(state, step=step, layout=layout, files=files)
    durable.write_json(tmp / "meta.json", meta.to_dict())
    replaced = root / (final.name + ".replaced.tmp")  # a .tmp name: never taken as complete
    if final.exists():  # the same step saved again: move the old copy aside, delete it last
        os.replace(final, replaced)
    os.replace(tmp, final)
    durable.fsync_dir(root)
    durable.write_json(root / LATEST, {"step": step, "dir": final.name})
    durable.remove_tree(replaced)


def _discard(tmp: Path, written: list[Path], topo: Topology) -> None:
    """After a failed save: each rank removes the files it wrote, then rank 0 the folder."""
    for path in written:
        try:
            path.unlink()
        except OSError:
            pass
    _barrier(topo)
    if topo.rank == 0:
        durable.remove_tree(tmp)
    _barrier(topo)  # the space is free again when the sentence reports it


def _write_failure(err: OSError | None, tmp: Path, topo: Topology, step: int, total: int, written: list) -> str:
    """One sentence: which rank, which file, why, what the checkpoint needs and what is free."""
    free = durable.free_bytes(tmp.parent)
    space = f"the checkpoint needs {durable.size(total)} and {durable.size(free)} are free there"
    if free < 0:
        space = f"the checkpoint needs {durable.size(total)}"
    end = f"{tmp} was removed and the previous checkpoint stays the latest"
    if err is None:
        return f"saving checkpoint step {step} to {tmp} failed on another rank (its message names the file); {space}; {end}"
    if durable.is_space_error(err) and not written:
        return (f"cannot save checkpoint step {step} in {tmp.parent}: {space} (free space or lower checkpoint.keep); "
                f"nothing was written and the previous checkpoint stays the latest")
    where = Path(err.filename).name if err.filename else tmp.name
    return f"saving checkpoint step {step} to {tmp} failed on rank {topo.rank}: {err.strerror} writing {where}; {space}; {end}"


def _rank_files(
    topo: Topology, model: nn.Module, optimizer: Any, rng: RNGStreams | None
) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
    """This rank's files: model slices, optimizer state, RNG states (name -> tensors, metadata)."""
    out: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]] = {}
    if topo.dp_cp_rank == 0:  # one writer per (pp, tp) slice: dp and cp replicas hold the same weights
        tensors, slices = _model_slices(model, topo)
        out[f"model_pp{topo.pp_rank}_tp{topo.tp_rank}.safetensors"] = (tensors, {"slices": json.dumps(slices)})
    elif topo.ep > 1 and topo.edp_rank == 0:  # the other ranks of dp rank 0's ep group: their experts
        tensors, slices = _model_slices(model, topo, experts_only=True)
        name = f"model_pp{topo.pp_rank}_tp{topo.tp_rank}_ep{topo.ep_rank}.safetensors"
        out[name] = (tensors, {"slices": json.dumps(slices)})
    # zero 0 keeps a full replica of the state on every dp rank: store it once (once per ep rank
    # under expert parallelism, whose experts differ: see `optimizer_state.local_entries`)
    if optimizer.cfg.zero > 0 or topo.dp_cp_rank == 0 or (topo.ep > 1 and topo.edp_rank == 0):
        opt_state = optimizer.state_dict()
        out[f"optim_rank{topo.rank}.safetensors"] = (opt_state["tensors"], {"meta": json.dumps(opt_state["meta"])})
    rng_tensors = {"torch_cpu": torch.get_rng_state()}
    if topo.device.type == "cuda":
        rng_tensors["torch_cuda"] = torch.cuda.get_rng_state(topo.device)
    if rng is not None:
        rng_tensors.update({f"stream/{k}": v.cpu() for k, v in rng.state_dict().items()})
    out[f"rng_rank{topo.rank}.safetensors"] = (rng_tensors, {})
    return out


def _write_rank_files(tmp: Path, files: dict, written: list[Path]) -> dict[str, Any]:
    """Write this rank's files (each fsynced, then the folder); its manifest: the files'
    sha256 and sizes, and for the index the model slices and optimizer entries they hold."""
    manifest: dict[str, Any] = {"files": {}, "bytes": {}, "model": {}, "optimizer": {}}
    for name, (tensors, metadata) in files.items():
        path = tmp / name
        written.append(path)
        durable.write_tensors(path, tensors, metadata)
        manifest["files"][name] = sha256_file(path)
        manifest["bytes"][name] = path.stat().st_size
        if name.startswith("model_"):
            manifest["model"][name] = json.loads(metadata["slices"])
        elif name.startswith("optim_"):
            manifest["optimizer"][name] = json.loads(metadata["meta"])["entries"]
    durable.fsync_dir(tmp)
    return manifest


def _collect_manifests(tmp: Path, world: int) -> list[dict[str, Any]]:
    """Every rank's manifest (its files' checksums, sizes and contents); the manifests are removed."""
    manifests = []
    for r in range(world):
        path = tmp / f"manifest_rank{r}.json"
        manifests.append(json.loads(path.read_text()))
        path.unlink()
    return manifests


def _prune(root: Path, keep: int) -> None:
    """Delete complete checkpoints beyond the newest `keep` (never the one `latest` names),
    and what earlier crashed saves left (`step_*.tmp`: only one save runs at a time)."""
    for stale in root.glob("step_*.tmp"):
        durable.remove_tree(stale)
    if keep <= 0:
        return
    complete = sorted(complete_checkpoints(root), key=step_of)
    for old in complete[:-keep]:
        durable.remove_tree(old)


# --- loading ------------------------------------------------------------------------------
def checkpoint_index(ckpt: str | Path) -> dict[str, Any] | None:
    """The checkpoint's verified index.json; None for one saved before the index existed
    (or a bare folder of state files without meta.json): the loaders then read headers."""
    if not (Path(ckpt) / "meta.json").is_file():
        return None
    return read_index(Path(ckpt), read_state(ckpt).files)


def model_reads(ckpt: Path, model: nn.Module, index: dict[str, Any] | None) -> Iterator[tuple]:
    """(parameter, piece, global name, file, slice info, lo, hi) for every stored slice
    region [lo, hi) along the piece's dim that this rank's pieces need; raises when the
    checkpoint does not cover a piece."""
    sources = model_sources(ckpt, index)
    for name, param, gname, piece in iter_pieces(model):
        if piece.length == 0:
            continue
        if gname not in sources:
            raise CheckpointCorruptError(f"checkpoint {str(ckpt)!r} holds no tensor {gname!r} (needed for {name})")
        need_lo, need_hi = piece.start, piece.start + piece.length
        covered = 0
        for path, info in sources[gname]:
            if info["dim"] != piece.dim:
                raise CheckpointCorruptError(f"{gname!r} is sliced along dim {info['dim']} in {path.name}, not {piece.dim}")
            lo, hi = max(need_lo, info["start"]), min(need_hi, info["start"] + info["length"])
            if lo < hi:
                yield param, piece, gname, path, info, lo, hi
                covered += hi - lo
        if covered < piece.length:
            raise CheckpointCorruptError(f"checkpoint {str(ckpt)!r} covers only {covered} of {piece.length} rows of {gname!r}")


@torch.no_grad()
def load_model(ckpt: str | Path, model: nn.Module) -> None:
    """Fill this rank's parameters (and an MoE's selection bias) from a checkpoint saved at any
    layout, reading only the regions of the stored slices that overlap this rank's pieces (the
    index says which files hold them, so no other file is opened)."""
    ckpt = Path(ckpt)
    for param, piece, gname, path, info, lo, hi in model_reads(ckpt, model, checkpoint_index(ckpt)):
        with safe_open(str(path), framework="pt") as f:
            view = f.get_slice(gname)
            index_expr = [slice(None)] * len(info["global_shape"])
            index_expr[info["dim"]] = slice(lo - info["start"], hi - info["start"])
            values = view[tuple(index_expr)]
        dst = param.narrow(piece.dim, piece.local_start + lo - piece.start, hi - lo)
        dst.copy_(values.to(dst.dtype))
    if (ckpt / "meta.json").is_file():  # the MoE selection bias, by global layer (so at any layout)
        load_expert_bias(model, read_state(ckpt).expert_bias)


def optimizer_reads(ckpt: str | Path, optimizer: Any, index: dict[str, Any] | None) -> list[Path]:
    """The optimizer files this rank reads: at the same layout its own, at another the
    ones whose entries overlap its elements (every file for a checkpoint without index).
    At zero 0 every dp x cp replica owns the same state, so all prefer the files of their
    group's first rank and read the same ones (`trident.checkpoint.resume` relies on it)."""
    t = optimizer.topo
    prefer = t.rank if optimizer.cfg.zero > 0 else t.layout.rank_of(t.pp_rank, 0, t.tp_rank, 0)
    wanted = [meta for meta, _, _ in local_entries(optimizer)]
    return optimizer_files(Path(ckpt), index, wanted, prefer)


def load_optimizer(ckpt: str | Path, optimizer: Any) -> None:
    """Load this rank's optimizer state from a checkpoint saved at any layout, reading only
    the stored ranges that overlap the elements it owns.

    The index picks the files (`optimizer_reads`): one at the same layout, the overlapping
    ones at another, never every rank's. Each is opened lazily (`safe_open`) and the
    optimizer reads through ``get_slice`` just the parts of the entries it needs.
    """
    paths = optimizer_reads(ckpt, optimizer, checkpoint_index(ckpt))
    if not paths:
        if not any(Path(ckpt).glob("optim_rank*.safetensors")):
            raise CheckpointCorruptError(f"checkpoint {str(ckpt)!r} holds no optimizer state")
        paths = sorted(Path(ckpt).glob("optim_rank*.safetensors"))[:1]  # nothing owned here: step and lr only
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
