"""Megatron-compatible memory-mapped indexed datasets: a ``.bin`` of token ids and an ``.idx``.

The format is Megatron-LM's ``MMIDIDX`` (``megatron/core/datasets/indexed_dataset.py``), so a
dataset preprocessed by either tool trains in the other. Both files are little-endian:

``.bin``  the token ids of every sequence, concatenated, no header.
``.idx``  ``MMIDIDX\\x00\\x00`` (9 bytes) | version uint64 = 1 | dtype code uint8 |
          sequence count N uint64 | document count D+1 uint64 |            (34-byte header)
          sequence lengths N x int32 | sequence byte pointers N x int64 |
          document indices (D+1) x int64 (0, ..., N)
          [| sequence modes N x int8, only in Megatron's multimodal datasets]

A *sequence* is the unit stored; a *document* is a run of sequences (one sequence per
document unless the corpus was split into sentences). The GPT dataset packs sequences.

The writer streams: tokens go to disk as they come, and only the per-sequence lengths are
kept in memory, in numpy buffers. Outputs are written under temporary names and renamed
when complete, so an interrupted run never leaves a half-written pair under the final names.
"""

from __future__ import annotations

import os
import shutil
import struct
import uuid
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from trident.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# magic, version, dtype code, sequence count, document-index count: 9 + 8 + 1 + 8 + 8 = 34 bytes.
_HEADER = struct.Struct("<9sQBQQ")
HEADER_SIZE = _HEADER.size

# Megatron's DType enum: the code stored in the header for each token dtype.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
CODE_OF_DTYPE: dict[np.dtype, int] = {dtype: code for code, dtype in DTYPE_CODES.items()}


def token_dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The dtype Megatron picks for a vocabulary: uint16 below 65500 ids, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def split_prefix(path: str | os.PathLike) -> str:
    """Accept ``data/x``, ``data/x.bin`` or ``data/x.idx`` and return the prefix ``data/x``."""
    text = os.fspath(path)
    for suffix in (".bin", ".idx"):
        if text.endswith(suffix):
            return text[: -len(suffix)]
    return text


def _tmp_name(path: str) -> str:
    # pid + random: two processes writing the same output never share a temporary file.
    return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class _GrowableArray:
    """An append-only numpy buffer that doubles: millions of lengths without Python ints."""

    def __init__(self, dtype: np.dtype | type, capacity: int = 1 << 16) -> None:
        self._data = np.empty(capacity, dtype=dtype)
        self._size = 0

    def extend(self, values: np.ndarray) -> None:
        need = self._size + len(values)
        if need > len(self._data):
            grown = np.empty(max(need, 2 * len(self._data)), dtype=self._data.dtype)
            grown[: self._size] = self._data[: self._size]
            self._data = grown
        self._data[self._size : need] = values
        self._size = need

    def append(self, value: int) -> None:
        self.extend(np.asarray([value], dtype=self._data.dtype))

    def __len__(self) -> int:
        return self._size

    def view(self) -> np.ndarray:
        return self._data[: self._size]


def write_index(
    path: str,
    dtype: np.dtype,
    sequence_lengths: np.ndarray,
    document_indices: np.ndarray,
) -> None:
    """Write an ``.idx`` file (not atomically: callers write to a temporary name)."""
    dtype = np.dtype(dtype)
    lengths = np.ascontiguousarray(sequence_lengths, dtype="<i4")  # [N]
    docs = np.ascontiguousarray(document_indices, dtype="<i8")  # [D+1]
    # pointer[i] = byte offset of sequence i in the .bin: an exclusive cumsum of the sizes.
    pointers = np.zeros(len(lengths), dtype="<i8")  # [N]
    if len(lengths) > 1:
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= dtype.itemsize
    with open(path, "wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, CODE_OF_DTYPE[dtype], len(lengths), len(docs)))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(docs.tobytes())


class IndexedDatasetWriter:
    """Streams sequences into ``PREFIX.bin`` / ``PREFIX.idx``; both appear only on ``finalize``.

    Use as a context manager: an exception (or Ctrl-C) inside the block removes the
    temporary files and leaves any previous dataset under the final names untouched.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type) -> None:
        self.prefix = split_prefix(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            valid = ", ".join(str(d) for d in CODE_OF_DTYPE)
            raise UserError(f"token dtype {self.dtype} has no MMIDIDX code; valid dtypes are {valid}.")
        self.bin_path = self.prefix + ".bin"
        self.idx_path = self.prefix + ".idx"
        Path(self.bin_path).parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin = _tmp_name(self.bin_path)
        self._tmp_idx = _tmp_name(self.idx_path)
        self._bin = open(self._tmp_bin, "wb", buffering=1 << 22)
        self._lengths = _GrowableArray(np.int32)
        self._doc_ends = _GrowableArray(np.int64)
        self._doc_ends.append(0)
        self._info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        self._done = False

    @property
    def num_sequences(self) -> int:
        return len(self._lengths)

    @property
    def num_documents(self) -> int:
        return len(self._doc_ends) - 1

    def _check_range(self, tokens: np.ndarray) -> None:
        # A silent wrap-around of ids (70000 -> 4464 in uint16) would corrupt training data.
        if self._info is not None and tokens.size and tokens.dtype != self.dtype:
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < self._info.min or hi > self._info.max:
                raise UserError(
                    f"token id {hi if hi > self._info.max else lo} does not fit the dataset dtype "
                    f"{self.dtype} (range {self._info.min}..{self._info.max}); use a wider dtype."
                )

    def add_documents(
        self,
        tokens: np.ndarray,
        sequence_lengths: np.ndarray,
        sequences_per_document: np.ndarray | None = None,
    ) -> None:
        """Append many sequences at once; the fast path for preprocessing chunks.

        tokens: [sum(sequence_lengths)] ids; sequence_lengths: [n]; sequences_per_document:
        [d] with sum n (default: every sequence is its own document).
        """
        tokens = np.asarray(tokens)
        lengths = np.asarray(sequence_lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"sequence lengths sum to {int(lengths.sum())} but {tokens.size} tokens were given")
        self._check_range(tokens)
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype.newbyteorder("<")).tobytes())
        self._lengths.extend(lengths.astype(np.int32))
        if sequences_per_document is None:
            per_doc = np.ones(len(lengths), dtype=np.int64)
        else:
            per_doc = np.asarray(sequences_per_document, dtype=np.int64)
            if int(per_doc.sum()) != len(lengths):
                raise ValueError("sequences_per_document must sum to the number of sequences")
        base = self._doc_ends.view()[-1]
        self._doc_ends.extend(base + np.cumsum(per_doc))

    def add_document(self, sequences: np.ndarray | Sequence[np.ndarray]) -> None:
        """Append one document: a token array, or a list of token arrays (its sequences)."""
        if isinstance(sequences, np.ndarray) and sequences.ndim == 1:
            sequences = [sequences]
        arrays = [np.asarray(s) for s in sequences]
        lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        tokens = np.concatenate(arrays) if arrays else np.empty(0, dtype=self.dtype)
        self.add_documents(tokens, lengths, np.array([len(arrays)], dtype=np.int64))

    def finalize(self) -> None:
        """Write the index and rename both files into place (.bin first, then .idx)."""
        self._bin.close()
        write_index(self._tmp_idx, self.dtype, self._lengths.view(), self._doc_ends.view())
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(self._tmp_idx, self.idx_path)
        self._done = True

    def abort(self) -> None:
        """Drop the temporary files; the final names are never touched."""
        if not self._bin.closed:
            self._bin.close()
        for path in (self._tmp_bin, self._tmp_idx):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._done = True

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.finalize()


class IndexedDataset:
    """Read-only view of ``PREFIX.bin`` / ``PREFIX.idx`` over numpy memmaps.

    ``ds[i]`` is sequence i as a zero-copy view of the ``.bin``; nothing is read until used.
    The header, version, dtype and both file sizes are checked on open, so a truncated or
    foreign file fails here with its name instead of producing garbage tokens later.
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = split_prefix(prefix)
        self.idx_path = self.prefix + ".idx"
        self.bin_path = self.prefix + ".bin"
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise UserError(f"indexed dataset file {path} does not exist; give the prefix of a .bin/.idx pair.")
        idx_size = os.path.getsize(self.idx_path)
        if idx_size < HEADER_SIZE:
            raise UserError(f"{self.idx_path} is {idx_size} bytes, shorter than the {HEADER_SIZE}-byte MMIDIDX header.")
        with open(self.idx_path, "rb") as f:
            magic, version, code, n, d1 = _HEADER.unpack(f.read(HEADER_SIZE))
        if magic != MAGIC:
            raise UserError(f"{self.idx_path} does not start with the MMIDIDX magic {MAGIC!r} (found {magic!r}).")
        if version != VERSION:
            raise UserError(f"{self.idx_path} has index version {version}; only version {VERSION} is supported.")
        if code not in DTYPE_CODES:
            raise UserError(f"{self.idx_path} has dtype code {code}; valid codes are 1..8.")
        self.dtype = DTYPE_CODES[code]
        expected = HEADER_SIZE + n * 4 + n * 8 + d1 * 8
        # Megatron's multimodal datasets append one int8 mode per sequence.
        if idx_size not in (expected, expected + n):
            raise UserError(
                f"{self.idx_path} is {idx_size} bytes but its header ({n} sequences, {d1} document "
                f"indices) implies {expected}; the file is truncated or corrupt."
            )
        mm = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        off = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(mm, dtype="<i4", count=n, offset=off)  # [N]
        off += n * 4
        self.sequence_pointers = np.frombuffer(mm, dtype="<i8", count=n, offset=off)  # [N]
        off += n * 8
        self.document_indices = np.frombuffer(mm, dtype="<i8", count=d1, offset=off)  # [D+1]
        off += d1 * 8
        self.sequence_modes = np.frombuffer(mm, dtype=np.int8, count=n, offset=off) if idx_size > expected else None
        if d1 < 1 or self.document_indices[0] != 0 or self.document_indices[-1] != n:
            raise UserError(
                f"{self.idx_path} has document indices that do not run from 0 to the sequence count {n}; the file is corrupt."
            )
        bin_size = os.path.getsize(self.bin_path)
        want = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize if n else 0
        if bin_size != want:
            raise UserError(
                f"{self.bin_path} is {bin_size} bytes but {self.idx_path} describes {want}; "
                "the pair is mismatched or truncated."
            )
        if bin_size:
            self._tokens = np.memmap(self.bin_path, dtype=self.dtype.newbyteorder("<"), mode="r")  # [T]
        else:  # numpy cannot memory-map an empty file
            self._tokens = np.empty(0, dtype=self.dtype)

    @staticmethod
    def exists(prefix: str | os.PathLike) -> bool:
        p = split_prefix(prefix)
        return os.path.isfile(p + ".idx") and os.path.isfile(p + ".bin")

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self._tokens.size)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence i, as a view of the memmap."""
        n = int(self.sequence_lengths[i])
        if length is None:
            length = n - offset
        if offset < 0 or length < 0 or offset + length > n:
            raise IndexError(f"range [{offset}, {offset + length}) is outside sequence {i} of length {n}")
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        return self._tokens[start : start + length]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(int(i))

    def document(self, d: int) -> np.ndarray:
        """All sequences of document d; contiguous in the .bin, so still a view."""
        first, last = int(self.document_indices[d]), int(self.document_indices[d + 1])
        if first == last:
            return self._tokens[:0]
        start = int(self.sequence_pointers[first]) // self.dtype.itemsize
        end = int(self.sequence_pointers[last - 1]) // self.dtype.itemsize + int(self.sequence_lengths[last - 1])
        return self._tokens[start:end]

    def __iter__(self) -> Iterable[np.ndarray]:
        for i in range(len(self)):
            yield self.get(i)


def merge_datasets(prefixes: Sequence[str | os.PathLike], output_prefix: str | os.PathLike) -> IndexedDataset:
    """Concatenate datasets of one dtype: indices are joined, ``.bin`` bytes copied verbatim."""
    if not prefixes:
        raise UserError("merge needs at least one input dataset prefix.")
    sources = [IndexedDataset(p) for p in prefixes]
    dtype = sources[0].dtype
    for src in sources[1:]:
        if src.dtype != dtype:
            raise UserError(
                f"cannot merge {src.prefix} (dtype {src.dtype}) with {sources[0].prefix} (dtype {dtype}); "
                "all inputs must share one token dtype."
            )
    out = split_prefix(output_prefix)
    if any(os.path.abspath(s.prefix) == os.path.abspath(out) for s in sources):
        raise UserError(f"merge output {out} is also an input; choose a new output prefix.")
    writer = IndexedDatasetWriter(out, dtype)
    with writer:
        for src in sources:
            with open(src.bin_path, "rb") as f:
                shutil.copyfileobj(f, writer._bin, length=1 << 24)
            writer._lengths.extend(src.sequence_lengths)
            base = writer._doc_ends.view()[-1]
            writer._doc_ends.extend(base + src.document_indices[1:])
    return IndexedDataset(out)
