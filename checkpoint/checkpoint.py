"""Checkpoints that survive crashes and layout changes: safetensors + JSON, no pickle.

Layout of one checkpoint, ``RUN_DIR/checkpoints/step_0000100/``::

    meta.json                      step, consumed samples, config, layout, scheduler,
                                   loss scaler, early-stopping state, sha256 of every file
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
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from trident.errors import UserError
from trident.parallel.random import RNGStreams
from trident.parallel.tensor.sharding import iter_pieces, tp_replicas
from trident.parallel.topology import Topology
from trident.parallel.zero.clip import default_exclude

if TYPE_CHECKING:
    from trident.model.config import ModelConfig

FORMAT = "trident-checkpoint/1"
LATEST = "latest"


class CheckpointCorruptError(UserError):
    """A checkpoint file is missing or fails its checksum."""


# --- small file helpers ---------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _step_of(path: Path) -> int:
    return int(path.name.split("_")[1])


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
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` under `root` (collective: every rank calls it).

    `state` is the JSON-able rest of the run: consumed samples, scheduler, config, ...
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

    written: dict[str, str] = {}

    def put(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str]) -> None:
        path = tmp / filename
        save_file(tensors, str(path), metadata=metadata)
        written[filename] = sha256_file(path)

    if topo.dp_rank == 0:
        tensors, slices = _model_slices(model, topo)
        put(tensors, f"model_pp{topo.pp_rank}_tp{topo.tp_rank}.safetensors", {"slices": json.dumps(slices)})
    opt_state = optimizer.state_dict()
    # zero 0 keeps a full replica of the state on every dp rank: store it once
    if optimizer.cfg.zero > 0 or topo.dp_rank == 0:
        put(opt_state["tensors"], f"optim_rank{topo.rank}.safetensors", {"meta": json.dumps(opt_state["meta"])})
    rng_tensors = {"torch_cpu": torch.get_rng_state()}
    if topo.device.type == "cuda":
        rng_tensors["torch_cuda"] = torch.cuda.get_rng_state(topo.device)
    if rng is not None:
        rng_tensors.update({f"stream/{k}": v.cpu() for k, v in rng.state_dict().items()})
    put(rng_tensors, f"rng_rank{topo.rank}.safetensors", {})
    _write_json_atomic(tmp / f"manifest_rank{topo.rank}.json", written)
    _barrier(topo)

    if topo.rank == 0:
        files: dict[str, str] = {}
        for r in range(topo.world):
            manifest = tmp / f"manifest_rank{r}.json"
            files.update(json.loads(manifest.read_text()))
            manifest.unlink()
        meta = {
            "format": FORMAT,
            "step": step,
            "layout": {"tp": topo.tp, "pp": topo.pp, "dp": topo.dp, "world": topo.world, "zero": optimizer.cfg.zero},
            "files": files,
            **state,
        }
        _write_json_atomic(tmp / "meta.json", meta)
        replaced = root / (final.name + ".replaced.tmp")  # a .tmp name: never taken as complete
        if final.exists():  # the same step saved again: move the old copy aside, delete it last
            os.replace(final, replaced)
        os.replace(tmp, final)
        _write_json_atomic(root / LATEST, {"step": step, "dir": final.name})
        shutil.rmtree(replaced, ignore_errors=True)
        _prune(root, keep)
    _barrier(topo)
    return final


def _prune(root: Path, keep: int) -> None:
    """Delete complete checkpoints beyond the newest `keep` (never the one `latest` names),
    and what earlier crashed saves left (`step_*.tmp`: only one save runs at a time)."""
    for stale in root.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep <= 0:
        return
    complete = sorted(complete_checkpoints(root), key=_step_of)
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# --- finding and verifying --------------------------------------------------------------------------
def complete_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        (p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp")
         and (p / "meta.json").is_file()),
        key=_step_of,
    )


def read_meta(ckpt: str | Path) -> dict[str, Any]:
    path = Path(ckpt) / "meta.json"
    if not path.is_file():
        raise CheckpointCorruptError(f"{str(path)!r} does not exist; {str(ckpt)!r} is not a complete checkpoint")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointCorruptError(f"{str(path)!r} is not valid JSON ({err.msg})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointCorruptError(f"{str(path)!r} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def verify(ckpt: str | Path) -> dict[str, Any]:
    """Check every file against its recorded sha256; raise naming the first bad file."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    for name, digest in sorted(meta["files"].items()):
        path = ckpt / name
        if not path.is_file():
            raise CheckpointCorruptError(f"checkpoint file {str(path)!r} is missing")
        actual = sha256_file(path)
        if actual != digest:
            raise CheckpointCorruptError(
                f"checkpoint file {str(path)!r} fails its sha256 check (recorded {digest[:12]}..., found {actual[:12]}...)"
            )
    return meta


def latest_valid(root: str | Path, log: bool = True) -> Path | None:
    """The checkpoint `latest` names if it verifies, else the newest one that does."""
    root = Path(root)
    candidates = complete_checkpoints(root)
    named = None
    latest_file = root / LATEST
    if latest_file.is_file():
        try:
            named = root / json.loads(latest_file.read_text())["dir"]
        except (json.JSONDecodeError, KeyError):
            named = None
    order = ([named] if named is not None and named in candidates else []) + [c for c in reversed(candidates) if c != named]
    for ckpt in order:
        try:
            verify(ckpt)
            return ckpt
        except CheckpointCorruptError as err:
            if log:
                print(f"checkpoint {ckpt.name} is unusable: {err}; falling back to an earlier one", flush=True)
    return None


# --- loading ------------------------------------------------------------------------------
def _model_index(ckpt: Path) -> dict[str, list[tuple[Path, dict]]]:
    """global name -> [(file, slice info)] over every model file of the checkpoint."""
    index: dict[str, list[tuple[Path, dict]]] = {}
    for path in sorted(ckpt.glob("model_pp*_tp*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            slices = json.loads(f.metadata()["slices"])
        for gname, info in slices.items():
            index.setdefault(gname, []).append((path, info))
    return index


@torch.no_grad()
def load_model(ckpt: str | Path, model: nn.Module) -> None:
    """Fill this rank's parameters from a checkpoint saved at any layout, reading only the
    regions of the stored slices that overlap this rank's pieces."""
    ckpt = Path(ckpt)
    index = _model_index(ckpt)
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


@dataclass
class Inspection:
    meta: dict[str, Any]
    tensors: dict[str, tuple[list[int], int]]  # global name -> (global shape, stored bytes)


def inspect_checkpoint(ckpt: str | Path) -> Inspection:
    """Metadata, verified checksums, and the global tensors with their shapes and bytes."""
    ckpt = Path(ckpt)
    meta = verify(ckpt)
    tensors: dict[str, tuple[list[int], int]] = {}
    for gname, entries in _model_index(ckpt).items():
        nbytes = 0
        for path, info in entries:
            with safe_open(str(path), framework="pt") as f:
                t = f.get_slice(gname)
                shape = t.get_shape()
                nbytes += int(torch.Size(shape).numel()) * torch.empty((), dtype=_dtype(t.get_dtype())).element_size()
        tensors[gname] = (entries[0][1]["global_shape"], nbytes)
    return Inspection(meta=meta, tensors=tensors)


def _dtype(name: str) -> torch.dtype:
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}.get(name, torch.float32)


# --- reading a checkpoint outside training (export, generation, import) ---------------------------
def find_checkpoint(path: str | Path) -> Path:
    """The verified checkpoint that `path` names: a ``step_NNNNNNN`` folder itself, or the
    newest complete one in a checkpoints folder (``latest`` first) or a run folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint path {str(path)!r} does not exist")
    if (path / "meta.json").is_file():
        verify(path)
        return path
    for root in (path, path / "checkpoints"):
        if complete_checkpoints(root):
            found = latest_valid(root)
            if found is None:
                raise CheckpointCorruptError(f"no checkpoint under {str(root)!r} passes its checksums")
            return found
    raise UserError(
        f"{str(path)!r} is not a checkpoint: give a step_NNNNNNN folder, a checkpoints folder or a run folder"
    )


def full_tensors(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """Every global model tensor of a checkpoint, whole, reassembled from the slices of
    whatever (tp, pp) layout wrote it, in the stored dtype (one process, no groups)."""
    ckpt = Path(ckpt)
    out: dict[str, torch.Tensor] = {}
    for gname, entries in _model_index(ckpt).items():
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


def find_tokenizer(ckpt: str | Path, meta: dict[str, Any] | None = None) -> Path | None:
    """The tokenizer a checkpoint was trained with, or None when it cannot be found.

    The run records the path it used (``tokenizer`` in meta.json, else the config's
    ``data.tokenizer``), often relative to where training ran; so that path is tried as
    given, then relative to the checkpoint, its checkpoints folder and its run folder,
    and finally a ``tokenizer.model``/``tokenizer.json`` lying in one of those folders.
    """
    ckpt = Path(ckpt)
    meta = meta if meta is not None else read_meta(ckpt)
    recorded = [meta.get("tokenizer"), (meta.get("config") or {}).get("data", {}).get("tokenizer")]
    folders = [ckpt, ckpt.parent, ckpt.parent.parent]
    candidates: list[Path] = []
    for name in (r for r in recorded if r):
        p = Path(name)
        candidates += [p] if p.is_absolute() else [p] + [folder / p for folder in folders]
    candidates += [folder / f for folder in folders for f in ("tokenizer.model", "tokenizer.json")]
    return next((c for c in candidates if c.exists()), None)


def model_config(meta: dict[str, Any]) -> "ModelConfig":
    """The `ModelConfig` a checkpoint was saved with (``config.model`` of its meta.json)."""
    from trident.model.config import ModelConfig

    saved = (meta.get("config") or {}).get("model")
    if not isinstance(saved, dict):
        raise CheckpointCorruptError("meta.json records no model config (config.model)")
    known = {f for f in ModelConfig.__dataclass_fields__}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise UserError(f"the checkpoint's model config has fields this trident does not know: {', '.join(unknown)}")
    return ModelConfig(**saved).validate()
