"""Blend indices at numpy speed, bit-identical to Megatron's sequential ``build_blending_indices``.

The rule (Megatron's C++ helper, and trident's former Python loop): sample ``i`` comes from
the dataset with the largest error ``w_d * max(i, 1) - count_d`` in float64, the first on a
tie. Each choice depends on every earlier one, so a per-sample loop looks unavoidable; in
Python it costs ~0.8 us a sample (minutes and gigabytes for 10^8 samples, on one rank while
the others wait).

Why it can still be vectorised: the choice at sample ``i`` depends only on the counts so
far, and the greedy forgets where it started. Two runs that reach sample ``i`` with
different counts (same total) pull their errors back into (-1, 1) and meet, with equal
counts at the same sample, within a few choices; from there on they are the same run. So
the range is cut into segments; every segment starts from the counts the weights imply
(a guess), and all segments advance together, one numpy step per offset (``L`` Python
iterations for ``P * L`` samples). Then each segment whose guessed start differs from its
predecessor's true end is run again from that end until it meets its own earlier run,
repeated until no start changes (segment 0 starts exactly, so the k-th pass fixes segment
k at the latest). Every sample is thus chosen by the same float64 expression, from the
same counts, as in the sequential loop: the result is exact, not approximately equal.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from trident.errors import UserError


def check_weights(weights: Sequence[float]) -> np.ndarray:
    """Weights as float64, or one sentence naming what is wrong with them."""
    w = np.asarray([float(x) for x in weights], dtype=np.float64)
    if w.size == 0:
        raise UserError("blend weights are empty; give one positive weight per dataset.")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise UserError(f"blend weights {w.tolist()} must all be positive finite numbers.")
    if abs(float(w.sum()) - 1.0) > 1e-6:
        raise UserError(f"blend weights {w.tolist()} sum to {float(w.sum())!r}; normalise them to sum to 1.")
    if w.size > np.iinfo(np.int16).max:
        raise UserError(f"a blend of {w.size} datasets is too many; at most {np.iinfo(np.int16).max}.")
    return w


def index_dtype(num_datasets: int) -> np.dtype:
    """The smallest dtype that names every dataset: uint8 up to 256, int16 (Megatron's) beyond."""
    return np.dtype(np.uint8) if num_datasets <= 256 else np.dtype(np.int16)


def sequential_blend_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """The per-sample Python loop (the former implementation): the oracle for tests and the bench."""
    w = [float(x) for x in weights]
    counts = [0] * len(w)
    chosen: list[int] = []
    sample: list[int] = []
    for i in range(size):
        x = float(i) if i > 1 else 1.0
        best, best_error = 0, w[0] * x - counts[0]
        for d in range(1, len(w)):
            error = w[d] * x - counts[d]
            if error > best_error:  # strict: the first dataset wins a tie
                best, best_error = d, error
        chosen.append(best)
        sample.append(counts[best])
        counts[best] += 1
    return np.array(chosen, dtype=index_dtype(len(w))), np.array(sample, dtype=np.int64)


def blend_indices(
    weights: Sequence[float], size: int, segment: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``size`` samples: its dataset (uint8/int16) and that dataset's sample (int64).

    ``segment`` (samples per lockstep segment) only changes the speed, never the result; the
    default balances Python steps against rework, about ``sqrt(size)``.
    """
    w = check_weights(weights)
    size = int(size)
    if size < 0:
        raise UserError(f"the blend size must be >= 0, got {size}.")
    # Runs from different counts meet within about 1 / w_min samples (a rare dataset's next
    # turn is what they disagree on), so a segment should be at least that long.
    length = segment or min(1 << 20, max(64, 2 * math.isqrt(max(size, 1)), math.ceil(2.0 / float(w.min()))))
    rows = max(1, -(-size // length))
    dataset_index = np.empty((rows, length), dtype=index_dtype(len(w)))  # [P, L], row-major = sample order
    sample_index = np.empty((rows, length), dtype=np.int64)  # [P, L]
    first = np.arange(rows, dtype=np.int64) * length  # [P] global sample of each segment's offset 0
    start = _guess_counts(w, first)  # [P, D]
    end = start.copy()
    _advance(w, dataset_index, sample_index, np.arange(rows), first, end)
    while True:
        truth = np.concatenate([start[:1], end[:-1]])  # segment j really starts where j-1 ends
        changed = np.flatnonzero((truth != start).any(axis=1))
        if changed.size == 0:
            break
        counts, old = truth[changed].copy(), start[changed].copy()
        met = _advance(w, dataset_index, sample_index, changed, first[changed], counts, old)
        start[changed] = truth[changed]
        end[changed[~met]] = counts[~met]  # a segment that met its old run keeps its old end
    return dataset_index.reshape(-1)[:size], sample_index.reshape(-1)[:size]


def _guess_counts(w: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Counts at each segment's first sample as the weights imply them: floor(w * i), and one
    more for the datasets nearest their next sample until they sum to ``i`` (exact at i = 0)."""
    ideal = first[:, None].astype(np.float64) * w[None, :]  # [P, D]
    counts = np.floor(ideal).astype(np.int64)
    short = first - counts.sum(axis=1)  # [P] how many counts are still missing
    q, r = np.divmod(short, len(w))
    rank = np.argsort(np.argsort(counts - ideal, axis=1, kind="stable"), axis=1, kind="stable")
    counts += q[:, None] + (rank < r[:, None])
    return counts


def _choose(w: np.ndarray, x: np.ndarray, counts: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """The loop's choice for each column: argmax over d of ``w_d * x - count_d``, first on ties.

    counts: [D, R] float64 (exact below 2^53); x: [R]; returns [R] intp. The first maximum
    is found as the largest ``D - d`` among the maxima (numpy's argmax over the short
    axis of a wide array is several times slower)."""
    error = np.multiply(w[:, None], x)  # [D, R] w_d * x, rounded as the loop rounds it
    error -= counts
    top = error.max(axis=0)  # [R]
    return (len(w) - ((error == top) * rank).max(axis=0)).astype(np.intp)


def _advance(
    w: np.ndarray,
    dataset_index: np.ndarray,
    sample_index: np.ndarray,
    rows: np.ndarray,
    first: np.ndarray,
    counts: np.ndarray,
    old: np.ndarray | None = None,
) -> np.ndarray:
    """Run segments ``rows`` in lockstep from ``counts`` [R, D], writing their choices;
    ``counts`` ends as each segment's end state. With ``old`` (the counts their earlier run
    started from), a segment stops as soon as its counts equal the earlier run's at the same
    sample, since the rest of that run is then unchanged. Returns, per row, whether it met
    its earlier run."""
    num, d = len(rows), len(w)
    rank = (d - np.arange(d, dtype=np.int32))[:, None]  # [D, 1]
    ids = np.arange(num)  # which of the R rows each live column is
    c = np.ascontiguousarray(counts.T, dtype=np.float64)  # [D, R]
    o = None if old is None else np.ascontiguousarray(old.T, dtype=np.float64)  # [D, R]
    x0, r = first.astype(np.float64), rows
    met = np.zeros(num, dtype=bool)
    block = _Block(dataset_index, sample_index) if old is None else None
    for t in range(dataset_index.shape[1]):
        if ids.size == 0:
            break
        pick = _choose(w, np.maximum(x0 + t, 1.0), c, rank)  # [R]
        flat = pick * ids.size + np.arange(ids.size)  # [R] into c.reshape(-1)
        taken = c.reshape(-1)[flat]
        c.reshape(-1)[flat] += 1.0
        if block is not None:
            block.put(t, pick, taken)
            continue
        assert o is not None
        o.reshape(-1)[dataset_index[r, t].astype(np.intp) * ids.size + np.arange(ids.size)] += 1.0
        dataset_index[r, t], sample_index[r, t] = pick, taken
        same = (c == o).all(axis=0)
        if same.any():
            met[ids[same]] = True
            keep = ~same
            ids, x0, r = ids[keep], x0[keep], r[keep]
            c, o = np.ascontiguousarray(c[:, keep]), np.ascontiguousarray(o[:, keep])  # views of these are written
    if block is not None:
        block.flush()
    counts[ids] = c.T
    return met


class _Block:
    """Choices of all segments for a few offsets, written out transposed in one go: writing a
    column of a [P, L] array per offset is several times slower than this blocked copy."""

    def __init__(self, dataset_index: np.ndarray, sample_index: np.ndarray, size: int = 64) -> None:
        rows = dataset_index.shape[0]
        self.out = (dataset_index, sample_index)
        self.buf = (np.empty((size, rows), dataset_index.dtype), np.empty((size, rows), np.int64))  # [B, P]
        self.start, self.used = 0, 0

    def put(self, t: int, pick: np.ndarray, taken: np.ndarray) -> None:
        if self.used == len(self.buf[0]):
            self.flush()
            self.start = t
        self.buf[0][self.used], self.buf[1][self.used] = pick, taken
        self.used += 1

    def flush(self) -> None:
        for out, buf in zip(self.out, self.buf):
            out[:, self.start : self.start + self.used] = buf[: self.used].T
        self.start += self.used
        self.used = 0
