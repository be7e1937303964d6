"""The global gradient norm of the whole model, from shards, and clipping by it.

The norm must be the norm of the unsharded model's gradient, whatever the layout, or a
clipped run would train differently at different layouts. Each rank adds up the squares
of the gradient elements it *owns* with a weight, and one all-reduce over every rank
gives the global sum:

* dp: each rank owns one contiguous 1/dp range of every gradient bucket (its ZeRO shard;
  at zero 0, where every rank holds the whole reduced bucket, the same range is used so
  that nothing is counted dp times); an expert bucket is split over its expert-data-
  parallel group instead, and the ep ranks hold disjoint experts, so each expert counts once;
* tp: an element that several tp ranks hold identically (a norm weight, a replicated kv
  head) is weighted 1/replicas; padding rows of a vocabulary shard belong to no global
  tensor and weigh 0 (`trident.parallel.tensor.sharding.Piece`);
* pp: stages hold disjoint layers, except the last stage's copy of a tied embedding,
  which weighs 0 (`trident.parallel.tensor.sharding.is_pipeline_duplicate`).

Because the groups tile the world, a single all-reduce over the default group replaces
three (tp, then pp, then dp). The same collective carries a count of non-finite
elements, so the inf/NaN verdict that decides whether to skip a step is the same on
every rank: a rank cannot step while another skips.

Clipping multiplies every shard by the same factor ``min(1, max_norm / (norm + 1e-6))``,
the formula of ``torch.nn.utils.clip_grad_norm_``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from trident.errors import UserError
from trident.parallel.collectives import comm_device
from trident.parallel.tensor.sharding import is_pipeline_duplicate, pieces_of, tp_replicas
from trident.parallel.topology import Topology
from trident.parallel.zero.grad_buffer import GradBuffer

NONFINITE_POLICIES = ("auto", "skip", "error")
Exclude = Callable[[str, nn.Parameter], bool]


class NonFiniteGradientError(RuntimeError):
    """The global gradient norm is inf or NaN and the run asked to stop rather than skip."""


def default_exclude(name: str, param: nn.Parameter) -> bool:
    """Parameters that are a second copy of a tensor counted elsewhere (tied embedding)."""
    return is_pipeline_duplicate(param)


def resolve_nonfinite_policy(policy: str, dtype: str) -> str:
    """``auto`` skips under fp16 (overflow is routine there) and raises otherwise."""
    if policy not in NONFINITE_POLICIES:
        raise UserError(f"non-finite gradient policy {policy!r} is invalid; valid values are {', '.join(NONFINITE_POLICIES)}")
    if policy == "auto":
        return "skip" if dtype == "fp16" else "error"
    return policy


def clip_coefficient(norm: float, max_norm: float) -> float:
    """The factor every shard is multiplied by (1.0 when clipping is off or not needed)."""
    if max_norm <= 0 or not math.isfinite(norm):
        return 1.0
    return min(1.0, max_norm / (norm + 1e-6))


@dataclass(frozen=True)
class Run:
    """Elements [start, end) of a bucket's norm range, each weighing `weight`."""

    start: int
    end: int
    weight: float


class ShardNorm:
    """This rank's weighted share of the global squared gradient norm, from a GradBuffer.

    The weights depend only on the layout, so they are computed once, as runs of equal
    weight (a handful per parameter), not as a tensor the size of the model.
    """

    def __init__(self, buffer: GradBuffer, topo: Topology, exclude: Exclude | None = None) -> None:
        self.buffer, self.topo = buffer, topo
        exclude = exclude or default_exclude
        self.ranges: list[tuple[int, int]] = []  # the owned norm range of each bucket
        self.runs: list[list[Run]] = []
        for b in buffer.buckets:
            share = b.numel // b.dp  # b.dp: the bucket's group (dp x cp, or the experts' edp)
            lo, hi = b.dp_rank * share, (b.dp_rank + 1) * share
            runs: list[Run] = []
            for slot in b.slots:
                s, e = max(lo, slot.start), min(hi, slot.start + slot.numel)
                if s >= e:
                    continue
                for rs, re, value in _weight_runs(slot.name, slot.param, topo.tp, exclude(slot.name, slot.param)):
                    rs, re = max(rs, s - slot.start), min(re, e - slot.start)
                    if value == 0.0 or rs >= re:
                        continue
                    start, end = slot.start + rs - lo, slot.start + re - lo
                    if runs and runs[-1].end == start and runs[-1].weight == value:
                        runs[-1] = Run(runs[-1].start, end, value)
                    else:
                        runs.append(Run(start, end, value))
            self.ranges.append((lo, hi))
            self.runs.append(runs)

    def owned_grads(self) -> list[torch.Tensor]:
        """Each bucket's reduced gradient over the owned norm range."""
        out = []
        for b, (lo, hi) in zip(self.buffer.buckets, self.ranges):
            off = b.shard_start
            out.append(b.main_grad[lo - off : hi - off])
        return out

    def local(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted sum of squares, count of non-finite elements) over what this rank owns."""
        sq = torch.zeros((), dtype=torch.float64, device=self.buffer.device)
        bad = torch.zeros((), dtype=torch.float64, device=self.buffer.device)
        for b in self.buffer.buckets:
            # all of main_grad, not just the norm range: at zero 0 a replica's whole
            # gradient must be checked, or an inf outside its range would go unseen
            bad += (~torch.isfinite(sum_of_squares(b.main_grad))).double()
        for g, runs in zip(self.owned_grads(), self.runs):
            for r in runs:
                part = sum_of_squares(g[r.start : r.end])
                sq += part if r.weight == 1.0 else part * r.weight
        return sq, bad

    def global_norm(self) -> tuple[float, bool]:
        """(the whole model's gradient norm, whether any rank holds inf/NaN) — the same
        values on every rank."""
        sq, bad = self.local()
        return global_norm_from_local(sq, bad, self.topo)


def sum_of_squares(x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """sum(x**2) as a float64 scalar, inf/NaN when x holds any, in one fast pass.

    Upcasting the whole buffer to float64 (x.double().pow(2).sum()) costs a copy and is
    ~30x slower on a CPU; a single fp32 norm of millions of elements loses ~1e-7. fp32
    norms of 1024-element rows summed in float64 keep the error near 1e-10 at fp32 speed.
    (A row's fp32 norm overflows only for gradients beyond ~1e17, which count as inf.)
    """
    x = x.reshape(-1)
    if x.dtype != torch.float32:
        x = x.float()
    n = x.numel() // chunk * chunk
    total = torch.linalg.vector_norm(x[:n].view(-1, chunk), dim=1).double().pow(2).sum()
    return total + x[n:].double().pow(2).sum()


def global_norm_from_local(sq: torch.Tensor, bad: torch.Tensor, topo: Topology) -> tuple[float, bool]:
    """Sum the per-rank shares over the whole job: (norm, found non-finite)."""
    t = torch.stack([sq.double(), bad.double()])
    if topo.world > 1 and dist.is_initialized():
        t = t.to(comm_device(topo))
        dist.all_reduce(t)
    total, count = t.tolist()
    found = count > 0 or not math.isfinite(total)
    return (math.sqrt(total) if math.isfinite(total) else total), found


def clip_(grads: list[torch.Tensor], coefficient: float) -> None:
    """Scale every shard by the same factor (no-op at 1.0)."""
    if coefficient != 1.0:
        for g in grads:
            g.mul_(coefficient)


def _element_weights(name: str, param: nn.Parameter, tp: int, excluded: bool) -> torch.Tensor:
    """Flat float64 weights of a local parameter's elements in the global norm."""
    w = torch.zeros(param.shape, dtype=torch.float64)
    if not excluded:
        for piece in pieces_of(param, name.rpartition(".")[2]):
            w.narrow(piece.dim, piece.local_start, piece.length).fill_(1.0 / tp_replicas(piece, tp))
    return w.reshape(-1)


def _runs(w: torch.Tensor) -> list[tuple[int, int, float]]:
    """Maximal runs of equal values: (start, end, value)."""
    if w.numel() == 0:
        return []
    cuts = (torch.nonzero(w[1:] != w[:-1]).flatten() + 1).tolist()
    starts, ends = [0] + cuts, cuts + [w.numel()]
    return [(s, e, float(w[s])) for s, e in zip(starts, ends)]


def _weight_runs(name: str, param: nn.Parameter, tp: int, excluded: bool) -> list[tuple[int, int, float]]:
    """Runs of equal weight over a local parameter's flat elements, from its pieces alone:
    a piece along dim 0, or one covering its whole dim, is one contiguous run, so no
    tensor the size of the parameter is made (1.2e9 float64 weights per rank at 70B);
    any other piece layout falls back to `_element_weights`."""
    if excluded:
        return []
    shape, numel = tuple(param.shape), param.numel()
    spans = []
    for piece in pieces_of(param, name.rpartition(".")[2]):
        if piece.length == 0:
            continue
        inner = numel // max(1, shape[0]) if shape else 1
        if piece.dim == 0:
            spans.append((piece.local_start * inner, (piece.local_start + piece.length) * inner, piece))
        elif piece.local_start == 0 and piece.length == shape[piece.dim]:
            spans.append((0, numel, piece))
        else:
            return _runs(_element_weights(name, param, tp, excluded))
    runs: list[tuple[int, int, float]] = []
    for start, end, piece in sorted(spans, key=lambda x: x[0]):
        weight = 1.0 / tp_replicas(piece, tp)
        if runs and runs[-1][1] == start and runs[-1][2] == weight:
            runs[-1] = (runs[-1][0], end, weight)
        else:
            runs.append((start, end, weight))
    return runs
