"""The default corpus: the running interpreter's standard-library sources, as JSONL.

Real text that nobody here wrote and that is identical wherever the same Python is
installed. ``site-packages``/``dist-packages`` are left out because their contents differ
from machine to machine; files are visited in sorted order so the output is byte-stable.
"""

from __future__ import annotations

import fnmatch
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from trident.errors import UserError

_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    """The standard-library folder of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(include: Sequence[str] | None = None, limit: int | None = None) -> list[Path]:
    """Sorted ``.py`` paths (relative to the stdlib root), filtered by glob patterns on the relative path."""
    root = stdlib_root()
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                found.append(Path(dirpath, name).relative_to(root))
    found.sort(key=lambda p: p.as_posix())
    if include:
        found = [p for p in found if any(fnmatch.fnmatchcase(p.as_posix(), pat) for pat in include)]
        if not found:
            raise UserError(f"no standard-library file matches {list(include)}; patterns are globs such as 'json/*.py'.")
    return found[:limit] if limit is not None else found


@dataclass(frozen=True)
class CorpusStats:
    files: int
    bytes: int
    skipped: int  # files that are not valid UTF-8 (the test suite keeps a few on purpose)


def write_stdlib_corpus(
    output: str | os.PathLike,
    include: Sequence[str] | None = None,
    limit: int | None = None,
) -> CorpusStats:
    """Write ``{"path": ..., "text": ...}`` per stdlib source file to ``output`` (atomically)."""
    root = stdlib_root()
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    files = size = skipped = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for rel in stdlib_sources(include, limit):
                try:
                    text = (root / rel).read_bytes().decode("utf-8")
                except (UnicodeDecodeError, OSError):
                    skipped += 1
                    continue
                line = json.dumps({"path": rel.as_posix(), "text": text}, ensure_ascii=False)
                f.write(line + "\n")
                files += 1
                size += len(text.encode("utf-8"))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return CorpusStats(files=files, bytes=size, skipped=skipped)
