"""Which checkpoints a folder holds, and whether each one is intact.

A checkpoint counts only once it is complete (renamed from ``step_N.tmp`` to ``step_N``
with its meta.json) and every file matches the sha256 recorded there. Training resumes,
export, generation and inspection all pick a checkpoint through these functions, so a
crash during a save or a damaged file is noticed the same way everywhere: the `latest`
pointer is preferred, and a checkpoint that fails its checks is passed over for the
newest one that does not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors import safe_open

from trident.checkpoint.state import CheckpointCorruptError, RunState, read_state
from trident.errors import UserError

LATEST = "latest"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def step_of(path: Path) -> int:
    """The step a ``step_NNNNNNN`` folder holds."""
    return int(path.name.split("_")[1])


def complete_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoint folders under `root`, oldest first (checksums not checked)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        (p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp")
         and (p / "meta.json").is_file()),
        key=step_of,
    )


def verify(ckpt: str | Path) -> RunState:
    """Check meta.json and every file against its recorded sha256; raise naming the first
    bad one. Returns the checkpoint's state."""
    ckpt = Path(ckpt)
    state = read_state(ckpt)
    for name, digest in sorted(state.files.items()):
        path = ckpt / name
        if not path.is_file():
            raise CheckpointCorruptError(f"checkpoint file {str(path)!r} is missing")
        actual = sha256_file(path)
        if actual != digest:
            raise CheckpointCorruptError(
                f"checkpoint file {str(path)!r} fails its sha256 check (recorded {digest[:12]}..., found {actual[:12]}...)"
            )
    return state


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


def model_index(ckpt: Path) -> dict[str, list[tuple[Path, dict]]]:
    """global name -> [(file, slice info)] over every model file of the checkpoint."""
    index: dict[str, list[tuple[Path, dict]]] = {}
    for path in sorted(ckpt.glob("model_pp*_tp*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            slices = json.loads(f.metadata()["slices"])
        for gname, info in slices.items():
            index.setdefault(gname, []).append((path, info))
    return index
