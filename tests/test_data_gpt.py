"""The GPT dataset: packing invariants, Megatron's indices, per-sample extras, the index cache."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from data_fixtures import *  # noqa: F401,F403
from trident.data import gpt_dataset as gd
from trident.data.gpt_dataset import GPTDataset, build_indices
from trident.data.indexed import IndexedDataset
from trident.errors import UserError


def make(prefix, cache_dir=None, **kw) -> GPTDataset:
    ds = IndexedDataset(prefix)
    kw.setdefault("seq_len", 16)
    return GPTDataset(ds, np.arange(len(ds)), cache_dir=cache_dir, use_cache=cache_dir is not None, **kw)


def unshuffled(g: GPTDataset) -> list[np.ndarray]:
    """Samples in sample-index order (undo the shuffle)."""
    out: list = [None] * len(g)
    for i in range(len(g)):
        out[int(g.shuffle_index[i])] = g.sample_tokens(i)[0]
    return out


@pytest.mark.parametrize("seq_len", [1, 7, 16, 100])
def test_one_epoch_covers_every_token_once_in_order(synthetic_prefix, seq_len):
    prefix, docs = synthetic_prefix
    g = make(prefix, seq_len=seq_len, seed=3)
    # the document index is a permutation of the documents: each exactly once
    assert sorted(g.document_index.tolist()) == list(range(len(docs)))
    stream = np.concatenate([docs[d] for d in g.document_index])  # documents in packing order
    samples = unshuffled(g)
    assert all(len(s) == seq_len + 1 for s in samples)
    for a, b in zip(samples, samples[1:]):
        assert a[-1] == b[0]  # consecutive samples share exactly one token
    inputs = np.concatenate([s[:-1] for s in samples])
    assert np.array_equal(inputs, stream[: len(inputs)])  # in order, none repeated or skipped
    assert samples[-1][-1] == stream[len(inputs)]
    assert len(stream) - len(inputs) - 1 < seq_len  # only an incomplete tail is left out
    assert sorted(g.shuffle_index.tolist()) == list(range(len(g)))


def test_doc_ids_and_loss_mask_follow_document_boundaries(synthetic_prefix):
    prefix, docs = synthetic_prefix
    starts = np.array([d[0] for d in docs])  # tokens are unique: a token's value tells its document
    g = make(prefix, seq_len=40, seed=1)
    for i in range(len(g)):
        s = g[i]
        assert {k: (v.shape, v.dtype) for k, v in s.items()} == {
            "tokens": ((40,), np.int64), "labels": ((40,), np.int64),
            "loss_mask": ((40,), np.float32), "doc_ids": ((40,), np.int64),
        }
        assert np.array_equal(s["labels"][:-1], s["tokens"][1:])
        doc_of = np.searchsorted(starts, s["tokens"], side="right")
        changes = np.concatenate([[0], np.cumsum(doc_of[1:] != doc_of[:-1])])
        assert np.array_equal(s["doc_ids"], changes)  # 0-based, +1 at each new document
        assert (s["loss_mask"] == 1).all()


def test_eod_loss_mask_on_real_text(stdlib_prefix):
    g = make(stdlib_prefix, seq_len=64, eod_id=2, eod_mask_loss=True)
    seen_eod = 0
    for i in range(len(g)):
        s = g[i]
        eod = s["tokens"] == 2
        seen_eod += int(eod.sum())
        assert np.array_equal(s["loss_mask"], (~eod).astype(np.float32))
        # preprocessing appended EOD to every document, so a new document starts right after one
        after = np.flatnonzero(eod[:-1]) + 1
        assert (s["doc_ids"][after] == s["doc_ids"][after - 1] + 1).all()
        assert (np.diff(s["doc_ids"]) > 0).sum() == len(after)
    assert seen_eod > 5
    with pytest.raises(UserError, match="eod_id"):
        make(stdlib_prefix, eod_mask_loss=True)


# --- Megatron's algorithm, restated from its description (helpers.cpp, gpt_dataset.py) ------


def reference_indices(lengths, documents, seq_len, num_samples, seed):
    tokens_per_epoch = int(lengths[documents].sum())
    epochs, have = 1, tokens_per_epoch
    while num_samples is not None and have < num_samples * seq_len + 1:
        epochs, have = epochs + 1, have + tokens_per_epoch
    separate = False
    if epochs > 1:
        before = ((epochs - 1) * tokens_per_epoch - 1) // seq_len
        separate = num_samples - before < int(0.8 * ((tokens_per_epoch - 1) // seq_len))
    rng = np.random.RandomState(seed)

    def doc_index(n):
        idx = np.mgrid[0:n, 0 : len(documents)][1]
        idx[:] = documents
        idx = idx.reshape(-1).astype(np.int32)
        rng.shuffle(idx)
        return idx

    di = np.concatenate([doc_index(epochs - 1), doc_index(1)]) if separate else doc_index(epochs)
    n = (epochs * tokens_per_epoch - 1) // seq_len
    si = np.zeros((n + 1, 2), dtype=np.int64)
    pos, off = 0, 0
    for s in range(1, n + 1):  # the per-sample loop of helpers.cpp's build_sample_idx
        remaining = seq_len + 1
        while remaining:
            doc_len = int(lengths[di[pos]]) - off
            remaining -= doc_len
            if remaining <= 0:
                off += remaining + doc_len - 1
                remaining = 0
            else:
                pos, off = pos + 1, 0
        si[s] = pos, off
    split_at = ((epochs - 1) * tokens_per_epoch - 1) // seq_len if separate else n
    first = np.arange(split_at, dtype=np.uint32)
    rng.shuffle(first)
    last = np.arange(split_at, n, dtype=np.uint32)
    rng.shuffle(last)
    return di, si, np.concatenate([first, last]), separate


@pytest.mark.parametrize(
    "seq_len, num_samples, separate",
    [(16, None, False), (16, 20, False), (9, 700, True), (9, 1200, False), (33, 250, True), (5, 3300, False), (5, 3000, True)],
)
def test_indices_match_megatron(synthetic_prefix, seq_len, num_samples, separate):
    prefix, _ = synthetic_prefix
    lengths = IndexedDataset(prefix).sequence_lengths
    documents = np.arange(10, 190, dtype=np.int32)  # a split in the middle
    di, si, sh, sep = reference_indices(lengths, documents, seq_len, num_samples, seed=1234)
    assert sep == separate
    got = build_indices(lengths, documents, seq_len, num_samples, seed=1234)
    assert np.array_equal(got["document_index"], di)
    assert np.array_equal(got["sample_index"], si)
    assert np.array_equal(got["shuffle_index"], sh) and got["shuffle_index"].dtype == np.uint32
    if num_samples is not None:
        assert len(got["shuffle_index"]) >= num_samples
    if separate:  # the final epoch is a permutation of its own, and its samples shuffle apart
        assert sorted(di[-len(documents):].tolist()) == documents.tolist()


def test_deterministic_and_seed_dependent(synthetic_prefix):
    prefix, _ = synthetic_prefix
    a, b, c = make(prefix, seed=5), make(prefix, seed=5), make(prefix, seed=6)
    assert all(np.array_equal(a[i]["tokens"], b[i]["tokens"]) for i in range(len(a)))
    assert not all(np.array_equal(a[i]["tokens"], c[i]["tokens"]) for i in range(len(a)))


def test_too_little_data_is_a_clear_error(tmp_path):
    write_synthetic(tmp_path / "tiny", [3, 2])
    with pytest.raises(UserError, match="5 tokens, not enough for one sample of seq_len \\+ 1 = 9"):
        make(tmp_path / "tiny", seq_len=8)


# --- the cache ----------------------------------------------------------------------------


def test_cache_is_reused_then_rebuilt_when_corrupt_or_stale(synthetic_prefix, tmp_path, monkeypatch):
    prefix, _ = synthetic_prefix
    builds = []
    real = gd.build_indices
    monkeypatch.setattr(gd, "build_indices", lambda *a, **k: builds.append(1) or real(*a, **k))
    cache = tmp_path / "cache"
    first = make(prefix, cache, num_samples=300, seed=9)
    files = sorted(p.name for p in cache.iterdir())
    assert len(builds) == 1 and len(files) == 4 and all(f.startswith(first.cache_name) for f in files)
    assert not any(".tmp" in f for f in files)

    again = make(prefix, cache, num_samples=300, seed=9)
    assert len(builds) == 1 and isinstance(again.sample_index, np.memmap)
    assert all(np.array_equal(first[i]["tokens"], again[i]["tokens"]) for i in range(0, len(first), 7))

    # flip bytes inside an array: the digest no longer matches, so it is rebuilt, not trusted
    victim = cache / f"{first.cache_name}-sample_index.npy"
    raw = bytearray(victim.read_bytes())
    raw[-8:] = b"\xff" * 8
    victim.write_bytes(bytes(raw))
    rebuilt = make(prefix, cache, num_samples=300, seed=9)
    assert len(builds) == 2 and np.array_equal(rebuilt.sample_index, first.sample_index)
    make(prefix, cache, num_samples=300, seed=9)
    assert len(builds) == 2  # the rebuilt cache is valid again

    (cache / f"{first.cache_name}.json").write_text("{not json")
    make(prefix, cache, num_samples=300, seed=9)
    assert len(builds) == 3

    other = make(prefix, cache, num_samples=300, seed=10)  # any parameter change -> another entry
    assert other.cache_name != first.cache_name and len(builds) == 4


def test_unwritable_cache_warns_and_keeps_indices_in_memory(synthetic_prefix, tmp_path):
    prefix, _ = synthetic_prefix
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="keeping the indices in memory"):
        g = make(prefix, blocker / "cache")
    assert len(g) > 0


def test_one_builder_others_wait_at_the_barrier(synthetic_prefix, tmp_path, monkeypatch):
    prefix, _ = synthetic_prefix
    builds = []
    real = gd.build_indices
    monkeypatch.setattr(gd, "build_indices", lambda *a, **k: builds.append(1) or real(*a, **k))
    barrier = threading.Barrier(3)
    results: dict[int, GPTDataset] = {}

    def rank(r: int) -> None:
        results[r] = make(prefix, tmp_path / "c", seed=2, barrier=barrier.wait, is_builder=(r == 0))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(builds) == 1 and sorted(results) == [0, 1, 2]
    assert isinstance(results[1].sample_index, np.memmap) and isinstance(results[2].shuffle_index, np.memmap)
    assert all(np.array_equal(results[0][i]["tokens"], results[2][i]["tokens"]) for i in range(len(results[0])))


def _rank_builds(prefix: str, cache_dir: str) -> list:
    """Runs on each rank of a gloo group: the default barrier is torch.distributed's."""
    import torch.distributed as dist

    builds = []
    real = gd.build_indices
    gd.build_indices = lambda *a, **k: builds.append(1) or real(*a, **k)
    try:
        g = make(prefix, cache_dir, seed=4)
    finally:
        gd.build_indices = real
    dist.barrier()
    return [len(builds), g[0]["tokens"].tolist()]


def test_distributed_rank0_builds(dist_pool, synthetic_prefix, tmp_path):
    prefix, _ = synthetic_prefix
    (r0, r1) = dist_pool.run(2, "test_data_gpt:_rank_builds", timeout=120, prefix=prefix, cache_dir=str(tmp_path))
    assert r0[0] == 1 and r1[0] == 0 and r0[1] == r1[1]
