"""One index per checkpoint of what each tensor file holds, so a loading rank opens only
the files it needs.

Without it a loading rank learns what the files hold by opening them: every model file's
header, and every saved rank's optimizer file (world^2 opens over a job: 16 M at 4,096
ranks, each a metadata read on a shared file system). At save time every rank reports
its files' slices (model) and entries (optimizer) beside their checksums; rank 0 writes
them once as ``index.json``, recorded in meta.json's checksums like any other file. A
loading rank then reads the index (verifying its sha256 from the bytes it parsed) and
opens, at the same layout, only its own optimizer file and its (pp, tp) model file; at
another layout only the files whose entries overlap what it owns.

Checkpoints written before the index existed have no ``index.json``: loading then falls
back to reading the files' headers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from safetensors import SafetensorError, safe_open

from trident.checkpoint.state import CheckpointCorruptError
from trident.parallel.zero.state_layout import overlap, span

INDEX = "index.json"
INDEX_FORMAT = "trident-checkpoint-index/1"


def build_index(manifests: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The index object from every rank's manifest (``model``: file -> slices,
    ``optimizer``: file -> entries, ``bytes``: file -> size)."""
    out: dict[str, Any] = {"format": INDEX_FORMAT, "model": {}, "optimizer": {}, "bytes": {}}
    for m in manifests:
        for key in ("model", "optimizer", "bytes"):
            out[key].update(m.get(key, {}))
    for key in ("model", "optimizer", "bytes"):
        out[key] = dict(sorted(out[key].items()))
    return out


def read_index(ckpt: Path, files: dict[str, str]) -> dict[str, Any] | None:
    """The checkpoint's index, its sha256 checked against meta.json's record (`files`);
    None for a checkpoint saved without one."""
    if INDEX not in files:
        return None
    path = ckpt / INDEX
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise CheckpointCorruptError(f"checkpoint file {str(path)!r} cannot be read ({err.strerror})") from None
    found = hashlib.sha256(raw).hexdigest()
    if found != files[INDEX]:
        raise CheckpointCorruptError(f"checkpoint file {str(path)!r} fails its sha256 check "
                                     f"(recorded {files[INDEX][:12]}..., found {found[:12]}...)")
    try:
        index = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointCorruptError(f"checkpoint file {str(path)!r} is not valid JSON") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise CheckpointCorruptError(f"checkpoint file {str(path)!r} is not a {INDEX_FORMAT!r} index")
    return index


def model_sources(ckpt: Path, index: dict[str, Any] | None) -> dict[str, list[tuple[Path, dict]]]:
    """global name -> [(model file, slice info)]: from the index, or (an older checkpoint)
    from every model file's header."""
    if index is not None:
        pairs = [(ckpt / name, slices) for name, slices in index["model"].items()]
    else:
        pairs = []
        for path in sorted(ckpt.glob("model_pp*_tp*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as f:
                    pairs.append((path, json.loads(f.metadata()["slices"])))
            except (SafetensorError, KeyError, json.JSONDecodeError):
                raise CheckpointCorruptError(f"checkpoint file {str(path)!r} has no readable slice table") from None
    out: dict[str, list[tuple[Path, dict]]] = {}
    for path, slices in pairs:
        for gname, info in slices.items():
            out.setdefault(gname, []).append((path, info))
    return out


def optimizer_files(ckpt: Path, index: dict[str, Any] | None, wanted: list[dict], prefer: int) -> list[Path]:
    """The optimizer files holding what a rank owns (`wanted`: its entries' metadata).

    An entry stored with exactly the wanted elements (the same layout) is read from one
    file -- rank `prefer`'s (its own) when that holds it; otherwise every file with an
    entry of the same tensor that overlaps is read (all of the tensor's files when it was
    cut along another dim: the loader then assembles it whole). Without an index: every file."""
    if index is None:
        return sorted(ckpt.glob("optim_rank*.safetensors"))
    by_tensor: dict[str, list[tuple[str, dict]]] = {}
    for name, entries in index["optimizer"].items():
        for e in entries:
            by_tensor.setdefault(e["global_name"], []).append((name, e))
    own = f"optim_rank{prefer}.safetensors"
    chosen: set[str] = set()
    for want in wanted:
        have = by_tensor.get(want["global_name"], [])
        exact = sorted({name for name, e in have if span(e) == span(want)}, key=lambda n: (n != own, n))
        if exact:
            chosen.add(exact[0])
        elif any(e["piece"]["dim"] != want["piece"]["dim"] for _, e in have):
            chosen.update(name for name, _ in have)
        else:
            chosen.update(name for name, e in have if overlap(want, e) is not None)
    return [ckpt / name for name in sorted(chosen)]
