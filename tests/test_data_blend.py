"""Splits and blends: Megatron's document ranges, exact blend proportions, the dataset builder."""

from __future__ import annotations

import numpy as np
import pytest

from data_fixtures import *  # noqa: F401,F403
from trident.data.blend import (
    BlendedDataset,
    DataConfig,
    build_blending_indices,
    build_gpt_datasets,
    parse_blend,
    parse_split,
    split_ranges,
)
from trident.data.gpt_dataset import GPTDataset
from trident.data.indexed import IndexedDataset
from trident.errors import UserError


def test_split_ranges_megatron_rounding():
    assert split_ranges("969,30,1", 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges("969, 30, 1", 10) == [(0, 10), (10, 10), (10, 10)]
    # rounded shares 3+3+3 fall one short of 10: the shortfall moves every bound after the first
    assert split_ranges("1,1,1", 10) == [(0, 4), (4, 7), (7, 10)]
    assert split_ranges("2,1,1", 10) == [(0, 6), (6, 8), (8, 10)]  # round(2.5) == 2, as in Megatron
    assert split_ranges("1", 7) == [(0, 7), (7, 7), (7, 7)]
    assert parse_split("0.9/0.1") == pytest.approx([0.9, 0.1, 0.0])
    for bad in ("a,b", "1,2,3,4", "0,0", "-1,2"):
        with pytest.raises(UserError, match="split"):
            parse_split(bad)


def test_parse_blend():
    assert parse_blend("data/a") == [(1.0, "data/a")]
    assert parse_blend("3 a.bin 1 b") == [(0.75, "a"), (0.25, "b")]
    assert parse_blend(["0.5", "a", "0.5", "b"]) == [(0.5, "a"), (0.5, "b")]
    assert parse_blend([(2, "a"), (2, "b")]) == [(0.5, "a"), (0.5, "b")]
    with pytest.raises(UserError, match="alternate"):
        parse_blend("0.5 a 0.5")
    with pytest.raises(UserError, match="weight 'a' is not a number"):
        parse_blend("a 0.5 b 0.5")
    with pytest.raises(UserError, match="positive"):
        parse_blend("0 a 1 b")


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [0.7, 0.3], [0.25, 0.25, 0.25, 0.25], [0.123, 0.456, 0.421]])
def test_blend_hits_weights_exactly(weights):
    n = 2000
    index, sample = build_blending_indices(weights, n)
    counts = np.zeros(len(weights))
    for i, d in enumerate(index):
        counts[d] += 1
        # every prefix is within one sample of its target
        assert np.abs(counts - np.array(weights) * (i + 1)).max() < 1.0
    expected = np.array(weights) * n
    if np.allclose(expected, np.round(expected)):
        assert counts.tolist() == np.round(expected).tolist()
    for d in range(len(weights)):  # each dataset's samples are taken 0, 1, 2, ... in order
        assert sample[index == d].tolist() == list(range(int(counts[d])))
    again = build_blending_indices(weights, n)
    assert np.array_equal(again[0], index) and np.array_equal(again[1], sample)
    # the blend of fewer samples is a prefix of the blend of more
    assert np.array_equal(build_blending_indices(weights, 777)[0], index[:777])


def test_blend_ties_go_to_the_first_dataset():
    index, _ = build_blending_indices([0.5, 0.5], 4)
    assert index.tolist() == [0, 1, 0, 1]


@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("blend")
    rng = np.random.default_rng(1)
    a = write_synthetic(d / "a", rng.integers(5, 40, size=120), start=1)
    b = write_synthetic(d / "b", rng.integers(5, 40, size=80), start=1_000_000)
    return d, a, b


def tokens_of(docs: list[np.ndarray], first: int, last: int) -> set[int]:
    return set(np.concatenate(docs[first:last]).tolist())


def test_single_prefix_split_carves_disjoint_document_ranges(two_corpora):
    d, a, _ = two_corpora
    config = DataConfig(seq_len=16, seed=3, cache_dir=str(d / "cache"))
    train, valid, test = build_gpt_datasets(str(d / "a"), "80,15,5", config, (None, 50, None))
    assert all(isinstance(x, GPTDataset) for x in (train, valid, test))
    ranges = split_ranges("80,15,5", 120)
    for ds, (lo, hi) in zip((train, valid, test), ranges):
        allowed = tokens_of(a, lo, hi)
        seen = set()
        for i in range(len(ds)):
            seen |= set(ds[i]["tokens"].tolist())
        assert seen <= allowed
    assert len(valid) >= 50
    none = build_gpt_datasets(str(d / "a"), "100,0,0", config, (None, None, None))
    assert none[1] is None and none[2] is None


def test_blend_draws_exact_counts_from_each_dataset(two_corpora):
    d, a, b = two_corpora
    config = DataConfig(seq_len=16, seed=3, cache_dir=str(d / "cache"))
    train, valid, _ = build_gpt_datasets(f"0.7 {d / 'a'} 0.3 {d / 'b'}", "90,10,0", config, (200, 40, None))
    assert isinstance(train, BlendedDataset) and len(train) == 200 and len(valid) == 40
    assert np.bincount(train.dataset_index).tolist() == [140, 60]
    assert np.bincount(valid.dataset_index).tolist() == [28, 12]
    for i in range(len(train)):
        tokens = train[i]["tokens"]
        from_b = tokens >= 1_000_000
        assert from_b.all() if train.dataset_index[i] == 1 else not from_b.any()
    # the same call again loads everything from the cache and gives the same samples
    again, _, _ = build_gpt_datasets(f"0.7 {d / 'a'} 0.3 {d / 'b'}", "90,10,0", config, (200, 40, None))
    assert isinstance(again.dataset_index, np.memmap)
    assert all(np.array_equal(train[i]["tokens"], again[i]["tokens"]) for i in range(0, 200, 9))


def test_blend_of_one_epoch_and_per_split_blends(two_corpora):
    d, _, _ = two_corpora
    config = DataConfig(seq_len=16, seed=3, cache_dir=str(d / "cache"))
    train, valid, test = build_gpt_datasets(
        None, "", config, (None, 30, None),
        blend_per_split=[f"1 {d / 'a'} 1 {d / 'b'}", str(d / "b"), None],
    )
    assert isinstance(train, BlendedDataset) and isinstance(valid, GPTDataset) and test is None
    a_len = len(GPTDataset(IndexedDataset(d / "a"), np.arange(120), 16, seed=3, use_cache=False))
    b_len = len(GPTDataset(IndexedDataset(d / "b"), np.arange(80), 16, seed=3, use_cache=False))
    counts = np.bincount(train.dataset_index, minlength=2)
    # one epoch: stops exactly before the scarcer dataset would have to repeat
    assert (counts <= [a_len, b_len]).all() and (counts == [a_len, b_len]).any()
    train[len(train) - 1]
    with pytest.raises(UserError, match="either one blend"):
        build_gpt_datasets(str(d / "a"), "1", config, (None, None, None), blend_per_split=[None, None, None])
    with pytest.raises(UserError, match="no training data"):
        build_gpt_datasets(None, "1", config, (None, None, None))


# --- the vectorised build (trident.data.blend_indices) ------------------------------------------


def straightforward_blend(weights, size):
    """The greedy read off its definition: per sample, numpy's first argmax of w * max(i, 1) - counts."""
    w = np.asarray(weights, dtype=np.float64)
    counts = np.zeros(len(w), dtype=np.int64)
    index, sample = [], []
    for i in range(size):
        d = int(np.argmax(w * float(max(i, 1)) - counts))
        index.append(d)
        sample.append(int(counts[d]))
        counts[d] += 1
    return index, sample


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_blend_is_bit_identical_to_the_loop(seed):
    from trident.data.blend_indices import blend_indices, sequential_blend_indices

    rng = np.random.default_rng(seed)
    d = int(rng.integers(2, 12))
    w = rng.random(d) ** 3 + 2e-3  # cubed: uneven, some small
    if seed == 5:
        w[1] = 1e-5  # one rare dataset: runs from different starts take ~1/w samples to meet
    w /= w.sum()
    size = 30_000
    want_index, want_sample = sequential_blend_indices(w, size)
    for segment in (None, 512, 1000) if seed < 5 else (None,):  # many segments: guessed starts repaired
        index, sample = blend_indices(w, size, segment=segment)
        assert index.dtype == np.uint8 and sample.dtype == np.int64
        assert np.array_equal(index, want_index) and np.array_equal(sample, want_sample), segment


def test_vectorised_blend_edge_cases_match_the_definition():
    from trident.data.blend_indices import blend_indices

    for weights, size in [([1.0], 50), ([0.5, 0.5], 7), ([1 / 3] * 3, 300), ([0.9, 0.1], 0), ([0.9, 0.1], 1),
                          ([0.9, 0.1], 2), (list(np.full(10, 0.1)), 1000)]:
        index, sample = blend_indices(weights, size, segment=16)
        want_index, want_sample = straightforward_blend(weights, size)
        assert index.tolist() == want_index and sample.tolist() == want_sample, (weights, size)
    index, sample = blend_indices([1.0], 50)
    assert index.tolist() == [0] * 50 and sample.tolist() == list(range(50))
    many = np.random.default_rng(3).dirichlet(np.ones(300))  # past 256 datasets: int16
    index, sample = blend_indices(many, 3000, segment=128)
    want_index, want_sample = straightforward_blend(many, 3000)
    assert index.dtype == np.int16 and index.tolist() == want_index and sample.tolist() == want_sample
    for bad, message in [([0.0, 1.0], "positive"), ([float("nan"), 1.0], "positive"), ([], "empty"),
                         ([2.0, 2.0], "normalise")]:
        with pytest.raises(UserError, match=message):
            blend_indices(bad, 10)


def test_ranks_wait_for_the_builder_on_the_store_with_a_timeout():
    from datetime import timedelta

    import torch.distributed as dist

    from trident.data.blend import _StoreWait

    store = dist.HashStore()
    store.set_timeout(timedelta(seconds=30))
    builder = _StoreWait(store, "k1", 0.5, True, "blend indices")
    other = _StoreWait(store, "k1", 0.5, False, "blend indices")
    builder()
    other()  # the builder posted "ok": returns at once
    with pytest.raises(UserError, match="rank 0 did not finish building the blend indices within 0 s"):
        _StoreWait(store, "k2", 0.2, False, "blend indices")()  # nobody posts: one sentence, no hang
    _StoreWait(store, "k3", 0.5, True, "blend indices").failed(OSError("disk full"))
    with pytest.raises(UserError, match="could not build the blend indices .*disk full"):
        _StoreWait(store, "k3", 0.5, False, "blend indices")()


def _blend_on_two_ranks(cache_dir: str) -> list:
    """Rank 0 builds while rank 1 waits on the store; then rank 0 fails a build."""
    import torch.distributed as dist

    from trident.data import blend

    rank = dist.get_rank()
    index, sample = blend.cached_blending_indices([0.6, 0.4], 5000, cache_dir)
    ok = [int(index.sum()), int(sample.sum())]
    def broken(weights, size):
        raise OSError("disk full")

    original = blend.build_blending_indices
    if rank == 0:
        blend.build_blending_indices = broken
    try:
        blend.cached_blending_indices([0.6, 0.4], 6000, cache_dir)
        failure = "none"
    except (UserError, OSError) as err:
        failure = f"{type(err).__name__}: {err}"
    finally:
        blend.build_blending_indices = original  # the worker process serves later tests
    return [ok, failure]


def test_a_failed_builder_ends_the_other_ranks_wait_with_one_sentence(dist_pool, tmp_path):
    (ok0, fail0), (ok1, fail1) = dist_pool.run(2, "test_data_blend:_blend_on_two_ranks", timeout=120,
                                               cache_dir=str(tmp_path / "cache"))
    index, sample = build_blending_indices([0.6, 0.4], 5000)
    assert ok0 == ok1 == [int(index.sum()), int(sample.sum())]
    assert fail0 == "OSError: disk full"
    assert fail1.startswith("UserError: rank 0 could not build the blend indices for 6000 samples") and "disk full" in fail1
