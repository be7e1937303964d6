"""Splits, weighted blends, and the one call the training engine makes to get its datasets.

A split string such as ``"969,30,1"`` carves each dataset into train/valid/test by
contiguous document ranges (Megatron's rounding, so the same documents land in the same
split in both tools). A blend such as ``"0.7 data/web 0.3 data/code"`` mixes datasets:
sample i comes from the dataset with the largest deficit ``w_d * max(i, 1) - count_d``
(first on ties), which keeps every prefix of the blend within one sample of its weights
and is deterministic (Megatron's ``build_blending_indices``, bit for bit; vectorised in
``blend_indices``).
"""

from __future__ import annotations

import itertools
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence, Union

import numpy as np

from trident.data.blend_indices import blend_indices
from trident.data.cache import ArrayCache, Barrier, cached_build
from trident.data.gpt_dataset import GPTDataset, default_cache_dir
from trident.data.indexed import IndexedDataset, split_prefix
from trident.errors import UserError

SPLIT_NAMES = ("train", "valid", "test")
BlendSpec = Union[str, Sequence[Union[str, float]], Sequence[tuple[float, str]]]


def parse_split(split: str) -> list[float]:
    """``"969,30,1"`` (or ``"0.9/0.1"``) -> three fractions summing to 1."""
    text = split.replace("/", ",")
    try:
        parts = [float(p) for p in text.split(",") if p.strip() != ""]
    except ValueError:
        raise UserError(f"split {split!r} is not a list of numbers; use e.g. '969,30,1'.") from None
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise UserError(f"split {split!r} needs one to three non-negative numbers with a positive sum, e.g. '969,30,1'.")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    return [p / total for p in parts]


def split_ranges(split: str, num_documents: int) -> list[tuple[int, int]]:
    """Document ranges ``[(start, end)] * 3`` for a split, with Megatron's rounding."""
    fractions = parse_split(split)
    bounds = [0]
    for fraction in fractions:
        bounds.append(bounds[-1] + int(round(fraction * float(num_documents))))
    excess = bounds[-1] - num_documents  # rounding may overshoot; take it off every bound
    bounds = [0] + [b - excess for b in bounds[1:]]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def parse_blend(spec: BlendSpec) -> list[tuple[float, str]]:
    """``"0.3 a 0.7 b"``, ``["0.3", "a", "0.7", "b"]``, ``[(0.3, "a"), ...]`` or ``"a"`` -> normalised pairs."""
    if isinstance(spec, (str, os.PathLike)):
        tokens: list = os.fspath(spec).split()
    else:
        tokens = list(spec)
    if tokens and all(isinstance(t, tuple) for t in tokens):
        pairs = [(float(w), os.fspath(p)) for w, p in tokens]
    elif len(tokens) == 1:
        pairs = [(1.0, os.fspath(tokens[0]))]
    else:
        if len(tokens) % 2:
            raise UserError(f"blend {spec!r} must alternate weights and prefixes, e.g. '0.7 data/a 0.3 data/b'.")
        pairs = []
        for w, p in zip(tokens[0::2], tokens[1::2]):
            try:
                pairs.append((float(w), os.fspath(p)))
            except (TypeError, ValueError):
                raise UserError(f"blend weight {w!r} is not a number; the blend alternates weights and prefixes.") from None
    if not pairs:
        raise UserError("the data blend is empty; give a dataset prefix or 'weight prefix ...'.")
    if any(w <= 0 for w, _ in pairs):
        raise UserError(f"blend weights {[w for w, _ in pairs]} must all be positive.")
    total = sum(w for w, _ in pairs)
    return [(w / total, split_prefix(p)) for w, p in pairs]


def build_blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``size`` samples: which dataset (uint8, int16 past 256) and which of its samples (int64).

    Megatron's greedy, bit for bit, vectorised in ``blend_indices`` (10^8 samples in
    seconds, not minutes). The blend for ``n`` samples is a prefix of the blend for any larger ``n``.
    """
    return blend_indices(weights, size)


class _StoreWait:
    """The barrier of the blend cache: the builder posts its outcome on the rendezvous store
    and the other ranks wait for it there, with a timeout sized to the build, instead of in
    a collective. A builder that fails or stalls then ends their wait with one sentence,
    not with a hang until the collective timeout and a wall of tracebacks."""

    def __init__(self, store: object, key: str, timeout_s: float, is_builder: bool, what: str) -> None:
        self.store, self.key, self.timeout_s, self.is_builder, self.what = store, key, timeout_s, is_builder, what

    def failed(self, err: BaseException) -> None:
        if self.is_builder:
            self.store.set(self.key, f"failed: {type(err).__name__}: {err}"[:500])

    def __call__(self) -> None:
        if self.is_builder:
            self.store.set(self.key, "ok")
            return
        try:
            self.store.wait([self.key], timedelta(seconds=self.timeout_s))
        except RuntimeError:  # torch's DistStoreError on timeout
            raise UserError(
                f"rank 0 did not finish building the {self.what} within {self.timeout_s:.0f} s; "
                "see rank 0's log for why (or a slow file system for the cache folder)."
            ) from None
        value = self.store.get(self.key).decode()
        if value != "ok":
            raise UserError(f"rank 0 could not build the {self.what} ({value}); see rank 0's log.")


_waits = itertools.count()  # every rank makes the same calls in the same order: keys match


def _store_wait(cache: ArrayCache, size: int, num_datasets: int, is_builder: bool | None) -> _StoreWait | None:
    """A store-backed wait when torch.distributed runs with a default store, else None."""
    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_backend() == "fake":
        return None  # one process, or a dry run's fake world: nobody to wait for
    try:
        store = dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None
    timeout = 300.0 + size * num_datasets * 2e-7  # several times the build on a loaded core; 5 min at least
    key = f"trident/blend/{cache.name}/{next(_waits)}"
    builder = dist.get_rank() == 0 if is_builder is None else is_builder
    return _StoreWait(store, key, timeout, builder, f"blend indices for {size} samples ({cache.name})")


def cached_blending_indices(
    weights: Sequence[float],
    size: int,
    cache_dir: str | os.PathLike | None,
    barrier: Barrier | None = None,
    is_builder: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``build_blending_indices`` through the index cache: it depends on nothing but its inputs.

    Under torch.distributed (and no explicit ``barrier``) the others wait for the builder on
    the store with a bounded timeout (``_StoreWait``)."""
    description = {"class": "BlendingIndices", "version": 2, "weights": [float(w) for w in weights], "size": int(size)}
    cache = ArrayCache(cache_dir, "blend", description)
    wait = _store_wait(cache, int(size), len(description["weights"]), is_builder) if barrier is None else None

    def build() -> dict[str, np.ndarray]:
        try:
            return dict(zip(("dataset_index", "dataset_sample_index"), build_blending_indices(weights, size)))
        except BaseException as err:
            if wait is not None:
                wait.failed(err)
            raise

    if wait is not None:
        barrier, is_builder = wait, wait.is_builder
    arrays = cached_build(cache, build, barrier=barrier, is_builder=is_builder)
    return arrays["dataset_index"], arrays["dataset_sample_index"]


class BlendedDataset:
    """Samples drawn from several datasets by weight; ``ds[i]`` is the chosen dataset's sample."""

    def __init__(
        self,
        datasets: Sequence[GPTDataset | None],
        weights: Sequence[float],
        dataset_index: np.ndarray,
        dataset_sample_index: np.ndarray,
        name: str = "train",
    ) -> None:
        self.datasets = list(datasets)
        self.weights = [float(w) for w in weights]
        self.dataset_index = dataset_index  # [size] uint8 (int16 past 256 datasets)
        self.dataset_sample_index = dataset_sample_index  # [size] int64
        self.name = name
        for d, dataset in enumerate(self.datasets):
            used = int((dataset_index == d).sum())
            if used and (dataset is None or len(dataset) < used):
                have = 0 if dataset is None else len(dataset)
                raise ValueError(f"blend dataset {d} must supply {used} samples but has {have}")

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} is outside the blended {self.name} dataset of {len(self)} samples")
        dataset = self.datasets[int(self.dataset_index[i])]
        assert dataset is not None
        return dataset[int(self.dataset_sample_index[i])]


@dataclass(frozen=True)
class DataConfig:
    """What the engine needs to say to get its datasets (the CLI/YAML layer maps onto this)."""

    seq_len: int
    seed: int = 1234
    eod_id: int | None = None
    eod_mask_loss: bool = False
    cache_dir: str | None = None  # None: "<folder of the first dataset>/cache"


def _documents_of(indexed: IndexedDataset, start: int, end: int) -> np.ndarray:
    """Sequence ids of documents ``[start, end)``; equal to the document ids in ordinary datasets."""
    first, last = int(indexed.document_indices[start]), int(indexed.document_indices[end])
    return np.arange(first, last, dtype=np.int32)


def build_gpt_datasets(
    blend: BlendSpec | None,
    split: str,
    config: DataConfig,
    num_samples: Sequence[int | None],
    blend_per_split: Sequence[BlendSpec | None] | None = None,
    barrier: Barrier | None = None,
    is_builder: bool | None = None,
) -> tuple[GPTDataset | BlendedDataset | None, ...]:
    """(train, valid, test) datasets from one blend carved by ``split``, or a blend per split.

    ``num_samples[k]`` is how many samples split k must provide (training iterations x
    global batch, for example); None means one epoch of its documents. A split whose
    share is 0, or whose blend is None, comes back as None.
    """
    if len(num_samples) != 3:
        raise UserError(f"num_samples needs three entries (train, valid, test), got {list(num_samples)}.")
    if blend_per_split is not None:
        if blend is not None:
            raise UserError("give either one blend with a split string or a blend per split, not both.")
        if len(blend_per_split) != 3:
            raise UserError(f"blend_per_split needs three entries (train, valid, test), got {len(blend_per_split)}.")
        specs = [None if b is None else parse_blend(b) for b in blend_per_split]
        ranges: list[list[tuple[int, int] | None]] = [
            [None] * len(s) if s is not None else [] for s in specs
        ]  # None: the whole dataset
    elif blend is not None:
        pairs = parse_blend(blend)
        specs = [pairs, pairs, pairs]
        ranges = []
        per_dataset = [split_ranges(split, IndexedDataset(p).num_documents) for _, p in pairs]
        for k in range(3):
            ranges.append([r[k] for r in per_dataset])
    else:
        raise UserError("no training data given; pass a dataset prefix, a blend, or a blend per split.")

    indexed_cache: dict[str, IndexedDataset] = {}

    def open_indexed(prefix: str) -> IndexedDataset:
        if prefix not in indexed_cache:
            indexed_cache[prefix] = IndexedDataset(prefix)
        return indexed_cache[prefix]

    def one(prefix: str, rng: tuple[int, int] | None, name: str, samples: int | None) -> GPTDataset:
        indexed = open_indexed(prefix)
        start, end = rng if rng is not None else (0, indexed.num_documents)
        return GPTDataset(
            indexed,
            _documents_of(indexed, start, end),
            config.seq_len,
            num_samples=samples,
            seed=config.seed,
            eod_id=config.eod_id,
            eod_mask_loss=config.eod_mask_loss,
            cache_dir=config.cache_dir,
            name=name,
            barrier=barrier,
            is_builder=is_builder,
        )

    out: list[GPTDataset | BlendedDataset | None] = []
    for k, name in enumerate(SPLIT_NAMES):
        pairs_k = specs[k]
        if pairs_k is None:
            out.append(None)
            continue
        live = [(w, p, r) for (w, p), r in zip(pairs_k, ranges[k]) if r is None or r[1] > r[0]]
        if not live:
            out.append(None)
            continue
        if len(live) < len(pairs_k):  # a dataset too small to have this split: renormalise
            total = sum(w for w, _, _ in live)
            live = [(w / total, p, r) for w, p, r in live]
        if len(live) == 1:
            _, prefix, r = live[0]
            out.append(one(prefix, r, name, num_samples[k]))
            continue
        weights = [w for w, _, _ in live]
        cache_dir = config.cache_dir or str(default_cache_dir(live[0][1]))
        size = num_samples[k]
        if size is None:
            # One epoch of the blend: stop before the first dataset would need a second epoch.
            datasets: list[GPTDataset | None] = [one(p, r, name, None) for _, p, r in live]
            size = min(int(len(d) / w) for d, w in zip(datasets, weights)) + len(live)
            index, sample = cached_blending_indices(weights, size, cache_dir, barrier, is_builder)
            over = [np.flatnonzero((index == d) & (sample >= len(ds))) for d, ds in enumerate(datasets)]
            stop = min([int(o[0]) for o in over if len(o)] + [size])
            index, sample = index[:stop], sample[:stop]
        else:
            # Blend first: each dataset is then asked for exactly the samples it must give.
            index, sample = cached_blending_indices(weights, size, cache_dir, barrier, is_builder)
            counts = np.bincount(index, minlength=len(live))
            datasets = [one(p, r, name, int(c)) if c > 0 else None for (_, p, r), c in zip(live, counts)]
        out.append(BlendedDataset(datasets, weights, index, sample, name=name))
    return tuple(out)
