"""Finding and reading corpus files: JSONL or plain text, plain or gzipped, by path, folder or glob.

Reading is split in two so that preprocessing can run it on two sides of a process pool:
``iter_records`` (cheap, in the main process) yields raw byte records with their
``file:line``; ``parse_record`` (in the workers) turns one record into the texts of one
document, or raises ``BadRecord`` with the reason.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Sequence

from trident.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_GLOB_CHARS = set("*?[")


class BadRecord(ValueError):
    """One input record that cannot be read as a document; the message is the reason."""


def expand_inputs(paths: Sequence[str]) -> list[str]:
    """Files named by ``paths``: files as given, folders walked and globs expanded, sorted.

    Sorting makes the output independent of the file system's listing order.
    """
    files: list[str] = []
    for path in paths:
        if _GLOB_CHARS & set(path):
            matched = sorted(p for p in glob.glob(path, recursive=True) if not os.path.isdir(p))
            if not matched:
                raise UserError(f"input pattern {path} matches no files.")
            files.extend(matched)
        elif os.path.isdir(path):
            found = []
            for root, dirs, names in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                found.extend(os.path.join(root, n) for n in names if not n.startswith("."))
            if not found:
                raise UserError(f"input folder {path} contains no files.")
            files.extend(sorted(found))
        elif os.path.exists(path):
            files.append(path)
        else:
            raise UserError(f"input {path} does not exist; give files, folders or glob patterns.")
    return files


def input_kind(path: str) -> str:
    """``"jsonl"`` for .jsonl/.json/.ndjson (optionally .gz), ``"text"`` for anything else."""
    name = path[:-3] if path.endswith(".gz") else path
    return "jsonl" if name.endswith(JSONL_SUFFIXES) else "text"


def open_binary(path: str) -> BinaryIO:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb", buffering=1 << 20)


@dataclass(frozen=True)
class Record:
    """One raw document (a JSONL line, a text line, or a whole text file) and where it was."""

    path: str
    line: int
    kind: str  # "jsonl" | "text"
    raw: bytes
    disk_bytes: int = 0  # bytes of the file on disk consumed up to this record (compressed for .gz)


def iter_records(files: Sequence[str], text_per_line: bool = False) -> Iterator[Record]:
    """Raw records of ``files`` in order; blank JSONL lines are not records.

    ``disk_bytes`` follows the position in the file on disk, so a progress bar over file
    sizes (and its time estimate) stays right for gzipped inputs too.
    """
    for path in files:
        kind = input_kind(path)
        with open_binary(path) as f:
            disk = getattr(f, "fileobj", None) or f  # a GzipFile reads from .fileobj
            last = 0

            def consumed() -> int:
                nonlocal last
                try:
                    pos = disk.tell()
                except OSError:  # a pipe: no position
                    return 0
                delta, last = pos - last, pos
                return delta

            if kind == "text" and not text_per_line:
                raw = f.read()
                yield Record(path, 1, kind, raw, consumed())
                continue
            for line_no, line in enumerate(f, start=1):
                if kind == "jsonl" and not line.strip():
                    continue
                yield Record(path, line_no, kind, line.rstrip(b"\r\n"), consumed())


def parse_record(record: Record, json_key: str = "text") -> list[str]:
    """The texts (sequences) of one document; a JSON value may be a string or a list of strings."""
    try:
        text = record.raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadRecord(f"not valid UTF-8 at byte {err.start}") from None
    if record.kind == "text":
        return [text]
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadRecord(f"malformed JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, found {type(obj).__name__}")
    if json_key not in obj:
        keys = ", ".join(sorted(obj)[:8]) or "none"
        raise BadRecord(f"missing key {json_key!r} (keys present: {keys})")
    value = obj[json_key]
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise BadRecord(f"key {json_key!r} holds {type(value).__name__}, not a string or a list of strings")


def iter_texts(paths: Sequence[str], json_key: str = "text", text_per_line: bool = False) -> Iterator[str]:
    """Every document of ``paths`` as one string (list values joined by newlines), bad lines skipped.

    For tokenizer training, where a stray bad line should not stop the run.
    """
    for record in iter_records(expand_inputs(paths), text_per_line=text_per_line):
        try:
            texts = parse_record(record, json_key)
        except BadRecord:
            continue
        yield "\n".join(texts)
