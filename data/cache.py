"""Index caches next to the data: built once, memory-mapped by every rank, never trusted blindly.

A cache entry is a set of ``.npy`` arrays plus a JSON manifest. The file names carry a
hash of a *description* (every parameter that affects the arrays), so a change of seed,
sequence length, split or document lengths lands under a new name instead of reusing a
stale one. The manifest, written last, records the description and each array's shape,
dtype and BLAKE2b digest; on load all of them are checked, and a mismatch means rebuild.

Every file is written under a temporary name and renamed, so concurrent builders (ranks
that share a file system but no barrier) each produce a complete, identical file and a
reader never sees half of one. No pickle: ``allow_pickle=False`` on both sides.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import uuid
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

Barrier = Callable[[], None]
_CHUNK = 1 << 24


def digest(array: np.ndarray) -> str:
    """BLAKE2b of an array's bytes, hashed in slices so a memmap is never copied whole."""
    h = hashlib.blake2b(digest_size=16)
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    for start in range(0, flat.size, _CHUNK):
        h.update(flat[start : start + _CHUNK])
    return h.hexdigest()


def description_hash(description: dict) -> str:
    text = json.dumps(description, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def resolve_distributed(barrier: Barrier | None, is_builder: bool | None) -> tuple[Barrier | None, bool]:
    """Fill in the barrier and builder role from ``torch.distributed`` when it is running.

    Only consults torch if something already imported it: preprocessing never pays for it.
    """
    dist = None
    if "torch" in sys.modules:
        import torch.distributed as torch_dist

        if torch_dist.is_available() and torch_dist.is_initialized():
            dist = torch_dist
    if barrier is None and dist is not None:
        barrier = dist.barrier
    if is_builder is None:
        is_builder = dist is None or dist.get_rank() == 0
    return barrier, is_builder


class ArrayCache:
    """One cache entry: ``{dir}/{stem}-{hash}.json`` and ``{dir}/{stem}-{hash}-{key}.npy``."""

    def __init__(self, cache_dir: str | os.PathLike | None, stem: str, description: dict) -> None:
        self.description = description
        self.dir = Path(cache_dir) if cache_dir is not None else None
        self.name = f"{stem}-{description_hash(description)}"

    def _path(self, key: str | None) -> Path:
        assert self.dir is not None
        return self.dir / (f"{self.name}.json" if key is None else f"{self.name}-{key}.npy")

    def load(self) -> dict[str, np.ndarray] | None:
        """The cached arrays (memory-mapped), or None when missing, stale or corrupt."""
        if self.dir is None:
            return None
        try:
            manifest = json.loads(self._path(None).read_text())
            if manifest.get("description") != self.description:
                return None
            arrays: dict[str, np.ndarray] = {}
            for key, meta in manifest["arrays"].items():
                array = np.load(self._path(key), mmap_mode="r", allow_pickle=False)
                if list(array.shape) != meta["shape"] or str(array.dtype) != meta["dtype"]:
                    return None
                if digest(array) != meta["blake2b"]:
                    return None
                arrays[key] = array
            return arrays
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
            return None

    def save(self, arrays: dict[str, np.ndarray]) -> None:
        """Write the arrays, then the manifest, each atomically; warn (not fail) if unwritable."""
        if self.dir is None:
            return
        tag = f"tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        written: list[Path] = []
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            meta = {}
            for key, array in arrays.items():
                final = self._path(key)
                tmp = final.with_name(f"{final.name}.{tag}")
                written.append(tmp)
                with open(tmp, "wb") as f:
                    np.save(f, array, allow_pickle=False)
                os.replace(tmp, final)
                meta[key] = {"shape": list(array.shape), "dtype": str(array.dtype), "blake2b": digest(array)}
            final = self._path(None)
            tmp = final.with_name(f"{final.name}.{tag}")
            written.append(tmp)
            tmp.write_text(json.dumps({"description": self.description, "arrays": meta}, indent=1, sort_keys=True))
            os.replace(tmp, final)
        except OSError as err:
            for path in written:
                path.unlink(missing_ok=True)
            warnings.warn(f"could not write the index cache in {self.dir} ({err}); keeping the indices in memory.")


def cached_build(
    cache: ArrayCache,
    build: Callable[[], dict[str, np.ndarray]],
    barrier: Barrier | None = None,
    is_builder: bool | None = None,
) -> dict[str, np.ndarray]:
    """Load the entry, or build it: the builder rank first, the others after the barrier.

    Every rank calls the barrier exactly once, whatever it found, so the collective stays
    matched. A rank that still finds no valid cache after the barrier (a node-local cache
    folder, an unwritable one) builds for itself, which is safe because writes are atomic.
    """
    barrier, is_builder = resolve_distributed(barrier, is_builder)
    arrays = cache.load()
    if arrays is None and is_builder:
        arrays = build()
        cache.save(arrays)
    if barrier is not None:
        barrier()
    if arrays is None:
        arrays = cache.load()
        if arrays is None:
            arrays = build()
            cache.save(arrays)
    return arrays
