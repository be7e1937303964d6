"""The MMIDIDX format: byte-exact golden files, round trips, merge, Megatron-written files, errors."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from trident.data.indexed import (
    HEADER_SIZE,
    IndexedDataset,
    IndexedDatasetWriter,
    merge_datasets,
    token_dtype_for_vocab,
)
from trident.errors import UserError

# The example: documents [5,6,7,0] and [8,9,1,2,0] as uint16.
GOLDEN_BIN = bytes.fromhex("0500 0600 0700 0000 0800 0900 0100 0200 0000")
GOLDEN_IDX = (
    b"MMIDIDX\x00\x00"
    + struct.pack("<Q", 1)  # version
    + struct.pack("<B", 8)  # dtype code: uint16
    + struct.pack("<Q", 2)  # sequences
    + struct.pack("<Q", 3)  # document indices (D + 1)
    + struct.pack("<2i", 4, 5)  # lengths
    + struct.pack("<2q", 0, 8)  # byte pointers
    + struct.pack("<3q", 0, 1, 2)  # document indices
)


def write_golden(prefix) -> None:
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        w.add_document(np.array([5, 6, 7, 0]))
        w.add_document(np.array([8, 9, 1, 2, 0]))


def test_golden_bytes(tmp_path):
    write_golden(tmp_path / "ex")
    assert (tmp_path / "ex.bin").read_bytes() == GOLDEN_BIN
    assert len(GOLDEN_BIN) == 18
    assert (tmp_path / "ex.idx").read_bytes() == GOLDEN_IDX
    assert HEADER_SIZE == 34
    assert sorted(os.listdir(tmp_path)) == ["ex.bin", "ex.idx"]  # no temporary files left


def test_reads_golden_files_written_by_hand(tmp_path):
    # Exactly what Megatron-LM writes for the example: read without our writer involved.
    (tmp_path / "m.bin").write_bytes(GOLDEN_BIN)
    (tmp_path / "m.idx").write_bytes(GOLDEN_IDX)
    ds = IndexedDataset(tmp_path / "m")
    assert ds.dtype == np.uint16 and len(ds) == 2 and ds.num_documents == 2 and ds.num_tokens == 9
    assert ds[0].tolist() == [5, 6, 7, 0] and ds[1].tolist() == [8, 9, 1, 2, 0]
    assert ds.get(1, offset=1, length=3).tolist() == [9, 1, 2]
    assert ds.document(1).tolist() == [8, 9, 1, 2, 0]
    assert isinstance(ds[1].base, np.memmap) or isinstance(ds[1], np.memmap)  # zero-copy view


def test_megatron_sentence_split_int32_with_modes(tmp_path):
    """A Megatron dataset with 2 documents of 2 and 1 sentences, int32, and a multimodal modes tail."""
    seqs = [[1, 2], [70000, 4, 5], [6]]
    lengths = [len(s) for s in seqs]
    pointers = [0, 8, 20]
    (tmp_path / "mm.bin").write_bytes(struct.pack("<6i", *[t for s in seqs for t in s]))
    idx = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 4, 3, 3)
    idx += struct.pack("<3i", *lengths) + struct.pack("<3q", *pointers) + struct.pack("<3q", 0, 2, 3)
    idx += struct.pack("<3b", 0, 0, 0)  # sequence modes
    (tmp_path / "mm.idx").write_bytes(idx)
    ds = IndexedDataset(tmp_path / "mm.bin")  # a .bin/.idx path is accepted as the prefix
    assert ds.dtype == np.int32 and ds.num_documents == 2 and len(ds) == 3
    assert ds.document(0).tolist() == [1, 2, 70000, 4, 5]
    assert ds.document(1).tolist() == [6]
    assert ds.sequence_modes is not None and ds.sequence_modes.tolist() == [0, 0, 0]


def parse_like_megatron(prefix: str) -> tuple[list[list[int]], list[int]]:
    """An independent reader written from the format description only (what Megatron does)."""
    with open(prefix + ".idx", "rb") as f:
        assert f.read(9) == b"MMIDIDX\x00\x00"
        (version,) = struct.unpack("<Q", f.read(8))
        (code,) = struct.unpack("<B", f.read(1))
        (n,) = struct.unpack("<Q", f.read(8))
        (d,) = struct.unpack("<Q", f.read(8))
        lengths = struct.unpack(f"<{n}i", f.read(4 * n))
        pointers = struct.unpack(f"<{n}q", f.read(8 * n))
        docs = list(struct.unpack(f"<{d}q", f.read(8 * d)))
        assert f.read() == b""
    assert version == 1
    fmt, size = {8: ("H", 2), 4: ("i", 4)}[code]
    data = open(prefix + ".bin", "rb").read()
    seqs = [list(struct.unpack(f"<{l}{fmt}", data[p : p + l * size])) for l, p in zip(lengths, pointers)]
    return seqs, docs


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_round_trip_and_foreign_reader(tmp_path, dtype):
    rng = np.random.default_rng(0)
    hi = 65000 if dtype == np.uint16 else 200000
    docs = [[rng.integers(0, hi, size=rng.integers(1, 20)) for _ in range(rng.integers(1, 4))] for _ in range(30)]
    with IndexedDatasetWriter(tmp_path / "rt", dtype) as w:
        for doc in docs[:10]:
            w.add_document(doc)
        # the batched path used by preprocessing, for the rest
        flat = [s for doc in docs[10:] for s in doc]
        w.add_documents(np.concatenate(flat), [len(s) for s in flat], [len(doc) for doc in docs[10:]])
    ds = IndexedDataset(tmp_path / "rt")
    want = [s.tolist() for doc in docs for s in doc]
    assert [ds[i].tolist() for i in range(len(ds))] == want
    assert ds.num_documents == len(docs)
    seqs, doc_index = parse_like_megatron(str(tmp_path / "rt"))
    assert seqs == want
    assert doc_index == [0] + np.cumsum([len(d) for d in docs]).tolist()


def test_token_dtype_rule():
    assert token_dtype_for_vocab(512) == np.uint16
    assert token_dtype_for_vocab(65499) == np.uint16
    assert token_dtype_for_vocab(65500) == np.int32
    assert token_dtype_for_vocab(128256) == np.int32


def test_writer_rejects_ids_that_do_not_fit(tmp_path):
    with pytest.raises(UserError, match="70000"):
        with IndexedDatasetWriter(tmp_path / "big", np.uint16) as w:
            w.add_document(np.array([1, 70000]))
    assert os.listdir(tmp_path) == []  # aborted: nothing under any name


def test_writer_abort_keeps_previous_output(tmp_path):
    write_golden(tmp_path / "ex")
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "ex", np.uint16) as w:
            w.add_document(np.array([1, 2, 3]))
            raise RuntimeError("boom")
    assert (tmp_path / "ex.bin").read_bytes() == GOLDEN_BIN
    assert (tmp_path / "ex.idx").read_bytes() == GOLDEN_IDX
    assert sorted(os.listdir(tmp_path)) == ["ex.bin", "ex.idx"]


def test_empty_dataset_round_trips(tmp_path):
    with IndexedDatasetWriter(tmp_path / "e", np.uint16):
        pass
    ds = IndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_documents == 0 and ds.num_tokens == 0


def test_merge(tmp_path):
    write_golden(tmp_path / "a")
    with IndexedDatasetWriter(tmp_path / "b", np.uint16) as w:
        w.add_document([np.array([3, 3]), np.array([4])])
    merged = merge_datasets([tmp_path / "a", tmp_path / "b", tmp_path / "a"], tmp_path / "m")
    assert [merged[i].tolist() for i in range(len(merged))] == [
        [5, 6, 7, 0], [8, 9, 1, 2, 0], [3, 3], [4], [5, 6, 7, 0], [8, 9, 1, 2, 0]
    ]
    assert merged.document_indices.tolist() == [0, 1, 2, 4, 5, 6]
    assert merged.sequence_pointers.tolist() == [0, 8, 18, 22, 24, 32]
    assert (tmp_path / "m.bin").read_bytes() == GOLDEN_BIN + bytes.fromhex("0300 0300 0400") + GOLDEN_BIN


def test_merge_rejects_mixed_dtypes(tmp_path):
    write_golden(tmp_path / "a")
    with IndexedDatasetWriter(tmp_path / "c", np.int32) as w:
        w.add_document(np.array([1]))
    with pytest.raises(UserError, match="dtype"):
        merge_datasets([tmp_path / "a", tmp_path / "c"], tmp_path / "m")
    assert not (tmp_path / "m.bin").exists()


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda idx: b"NOTMMIDX\x00" + idx[9:], "magic"),
        (lambda idx: idx[:9] + struct.pack("<Q", 2) + idx[17:], "version 2"),
        (lambda idx: idx[:17] + struct.pack("<B", 9) + idx[18:], "dtype code 9"),
        (lambda idx: idx[:-8], "truncated or corrupt"),
        (lambda idx: idx[:40], "implies"),
        (lambda idx: idx[:10], "shorter than the 34-byte"),
        (lambda idx: idx[:-24] + struct.pack("<3q", 0, 1, 5), "document indices"),
    ],
)
def test_header_corruption_names_the_file(tmp_path, corrupt, message):
    (tmp_path / "x.bin").write_bytes(GOLDEN_BIN)
    (tmp_path / "x.idx").write_bytes(corrupt(GOLDEN_IDX))
    with pytest.raises(UserError, match=message) as info:
        IndexedDataset(tmp_path / "x")
    assert str(tmp_path / "x.idx") in str(info.value)


def test_bin_size_mismatch_names_the_file(tmp_path):
    (tmp_path / "x.bin").write_bytes(GOLDEN_BIN[:-2])
    (tmp_path / "x.idx").write_bytes(GOLDEN_IDX)
    with pytest.raises(UserError, match="16 bytes") as info:
        IndexedDataset(tmp_path / "x")
    assert str(tmp_path / "x.bin") in str(info.value)


def test_missing_file(tmp_path):
    (tmp_path / "x.idx").write_bytes(GOLDEN_IDX)
    with pytest.raises(UserError, match="x.bin does not exist"):
        IndexedDataset(tmp_path / "x")
