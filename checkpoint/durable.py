"""Writing checkpoint files so that they survive a power cut, and failing cleanly when they cannot.

A rename is only as durable as the data and the folder entries behind it: a file written
and renamed without ``fsync`` can come back empty after a crash of the machine (ext4,
XFS and Lustre all reorder data behind metadata), and the ``latest`` pointer could then
name a folder of zero-length files. So every file is fsynced once written, the folder
once its files are in, and the parent folder after each rename -- before ``latest``
changes. Each rank creates the folders it writes into itself (``exist_ok``): on a shared
file system another node's ``mkdir`` may not be visible yet here.

A full disk (or a quota) is turned into one sentence naming the folder, the bytes the
checkpoint needs and the bytes free, instead of the raw safetensors error that names a
temporary file or nothing.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

_OS_ERROR = re.compile(r"os error (\d+)")


def fsync_file(path: Path) -> None:
    """Flush a written file's data and size to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the folder's entries (files created or renamed in it) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a platform without folder handles (Windows): nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):  # some file systems cannot sync a folder
            raise
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any, indent: int | None = 2) -> None:
    """Write `obj` as JSON under `path` atomically and durably (a temporary name, fsync,
    rename, fsync of the folder)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """safetensors' `save_file`, fsynced; its I/O errors as an `OSError` naming `path`.

    safetensors reports a full disk as ``SafetensorError("... No space left on device (os
    error 28) at path ...<random temporary name>")``: the errno is recovered from the text
    so the caller can say what happened to which file."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as err:
        found = _OS_ERROR.search(str(err))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None
    fsync_file(path)


def tensor_file_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """The size of the safetensors file `write_tensors` writes, to within the header's
    padding: the tensors' bytes plus a JSON header (8-byte length, names, shapes, offsets)."""
    body = sum(t.numel() * t.element_size() for t in tensors.values())
    header = 8 + 2 + len(json.dumps({"__metadata__": metadata}))
    header += sum(len(name) + 96 + 8 * t.dim() for name, t in tensors.items())
    return body + header + 8


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer can still use on `path`'s file system (its nearest
    existing folder); -1 when it cannot be told."""
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return -1
    return -1


def size(n: float) -> str:
    """A byte count for a sentence: exact bytes and a readable size."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{int(n)} bytes ({n / scale:.2f} {unit})"
    return f"{int(n)} bytes"


def remove_tree(path: Path) -> None:
    """Remove a partial checkpoint folder; what is already gone (another rank removed it
    first, on a shared file system) is not an error."""
    shutil.rmtree(path, ignore_errors=True)


def is_space_error(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
