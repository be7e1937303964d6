"""How each local parameter maps onto named global tensors, and layout-free initialisation.

A local parameter is a concatenation, along one dimension, of slices of global tensors
(its `Piece`s). A column-parallel weight is one piece (my rows of ``weight``); a fused
QKV weight is three (my rows of ``q.weight``, ``k.weight`` and ``v.weight``); a
vocabulary shard may be followed by padding rows that belong to no global tensor.

That one description serves three jobs:

* initialisation: the full value of every global tensor depends only on the seed and the
  tensor's global name (a generator seeded from both), and each rank draws only its slices
  of it (`init_slice`, never the whole tensor), so a model sharded at any tp, split at any
  pp, is exactly the slices of the single-process model;
* gathering to full shape (tests, export) and loading from full tensors;
* checkpoints, which store tensors by global name and slice.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from trident.parallel.collectives import all_reduce, group_device
from trident.parallel.topology import group_size

_ATTR = "_trident_pieces"


# --- per-parameter flags ---------------------------------------------------------------------
# Facts about a parameter that the reductions need and only the code that creates the
# parameter knows. Declared here, once; set by the model (`trident.model`) as it builds its
# parameters; read by the pipeline's finalisation, the gradient buffers, the norm and the
# checkpoint writer.
TP_PARTIAL = "tp_partial_grad"
"""Replicated over tp, but each tp rank's gradient is a partial sum (it was applied to this
rank's sequence shard or heads): summed over tp once per step, before the dp reduction."""
PIPELINE_TIED = "pipeline_tied"
"""One of the two copies of an embedding tied across pipeline stages (first and last):
their gradients are summed over the embedding group once per step."""
PIPELINE_DUPLICATE = "pipeline_duplicate"
"""The last stage's copy of a tied embedding: counted nowhere (norm, checkpoint, counts)."""
MAIN_GRAD = "main_grad"
"""Set by a gradient buffer on the two kinds above: the fp32 view of the buffer their
gradients accumulate in (Megatron's ``main_grad``), which finalisation sums in place, so
a bf16/fp16 model never rounds (or overflows) a deferred gradient to the compute dtype."""
ZERO3_SHARDED = "zero3_sharded"
"""Held as a ZeRO-3 shard (`trident.parallel.zero.sharded_params`): its gradient is reduced
(and its deferred sums done) on shards by the sharding code, not by `finalize_grads`."""
EXPERT = "expert_parallel"
"""One of this rank's E/ep experts under expert parallelism (`trident.parallel.expert`): held
by the dp/ep ranks of its expert-data-parallel group only, so its gradient is reduced, and
ZeRO-sharded, over that group (`Topology.edp_group`), not over dp."""


def mark_expert(param: nn.Parameter) -> nn.Parameter:
    setattr(param, EXPERT, True)
    return param


def is_expert(param: nn.Parameter) -> bool:
    return getattr(param, EXPERT, False)


def mark_tp_partial_grad(param: nn.Parameter) -> nn.Parameter:
    setattr(param, TP_PARTIAL, True)
    return param


def mark_pipeline_tied(param: nn.Parameter, duplicate: bool) -> nn.Parameter:
    setattr(param, PIPELINE_TIED, True)
    if duplicate:
        setattr(param, PIPELINE_DUPLICATE, True)
    return param


def is_tp_partial(param: nn.Parameter) -> bool:
    return getattr(param, TP_PARTIAL, False)


def is_pipeline_tied(param: nn.Parameter) -> bool:
    return getattr(param, PIPELINE_TIED, False)


def is_pipeline_duplicate(param: nn.Parameter) -> bool:
    return getattr(param, PIPELINE_DUPLICATE, False)


def mark_zero3_sharded(param: nn.Parameter) -> nn.Parameter:
    setattr(param, ZERO3_SHARDED, True)
    return param


def is_zero3_sharded(param: nn.Parameter) -> bool:
    return getattr(param, ZERO3_SHARDED, False)


def set_main_grad(param: nn.Parameter, grad: torch.Tensor | None) -> None:
    """Point `MAIN_GRAD` at `grad` (fp32, param-shaped), or remove it (None)."""
    if grad is None:
        param.__dict__.pop(MAIN_GRAD, None)
    else:
        setattr(param, MAIN_GRAD, grad)


def reduction_grad(param: nn.Parameter) -> torch.Tensor | None:
    """The gradient finalisation sums in place: the fp32 `MAIN_GRAD` when a gradient buffer
    keeps one, else ``param.grad``."""
    main = getattr(param, MAIN_GRAD, None)
    return main if main is not None else param.grad


@dataclass(frozen=True)
class Piece:
    """A slice ``global[start:start+length]`` along `dim`, stored at ``local[local_start:...]``.

    `name` replaces the parameter's leaf name to form the global name: a piece named
    ``q.weight`` of ``layers.0.attn.qkv.weight`` is the global ``layers.0.attn.qkv.q.weight``.
    """

    name: str
    global_shape: tuple[int, ...]
    dim: int
    start: int
    length: int
    local_start: int
    init: str = "normal"  # normal | zeros | ones
    std: float = 0.02
    replicas: int = 1  # how many tp ranks hold this same slice (a replicated kv head)


def set_pieces(param: nn.Parameter, pieces: list[Piece]) -> nn.Parameter:
    setattr(param, _ATTR, tuple(pieces))
    return param


def pieces_of(param: nn.Parameter, leaf: str) -> tuple[Piece, ...]:
    """The pieces of a parameter; an unannotated parameter is one global tensor that every
    tp rank holds whole (norm weights and biases: ones and zeros)."""
    found = getattr(param, _ATTR, None)
    if found is not None:
        return found
    shape = tuple(param.shape)
    return (Piece(leaf, shape, 0, 0, shape[0], 0, init="ones" if leaf == "weight" else "zeros", replicas=-1),)


def tp_replicas(piece: Piece, tp: int) -> int:
    """How many ranks of a tp group hold this piece's elements (-1 in a Piece means all).

    A global quantity summed over the tp group (the gradient norm, a parameter count)
    divides each piece's contribution by this, so replicated values count once.
    """
    return tp if piece.replicas == -1 else piece.replicas


def local_grad_sq_norm(module: nn.Module, tp: int) -> torch.Tensor:
    """This rank's share of the squared gradient norm, such that the sum over the tp group
    is the squared norm of the whole (unsharded) gradient: replicated slices are weighted
    by 1/replicas and padding rows, which belong to no global tensor, are left out."""
    total = torch.zeros((), dtype=torch.float64)
    for name, param in module.named_parameters():
        if param.grad is None:
            continue
        for piece in pieces_of(param, name.rpartition(".")[2]):
            g = param.grad.detach().narrow(piece.dim, piece.local_start, piece.length)
            total += g.double().pow(2).sum().cpu() / tp_replicas(piece, tp)
    return total


def global_name(param_name: str, piece: Piece) -> str:
    prefix = param_name.rpartition(".")[0]
    return f"{prefix}.{piece.name}" if prefix else piece.name


def iter_pieces(module: nn.Module) -> Iterator[tuple[str, nn.Parameter, str, Piece]]:
    """(local parameter name, parameter, global tensor name, piece) for every piece."""
    for name, param in module.named_parameters():
        for piece in pieces_of(param, name.rpartition(".")[2]):
            yield name, param, global_name(name, piece), piece


def global_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {gname: piece.global_shape for _, _, gname, piece in iter_pieces(module)}


def name_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from the run seed and a global tensor name."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def full_init_value(seed: int, name: str, piece: Piece) -> torch.Tensor:
    """The full fp32 value of global tensor `name`: a function of (seed, name) alone.

    This defines the values; `init_slice` produces a slice of it without the whole."""
    if piece.init == "zeros":
        return torch.zeros(piece.global_shape)
    if piece.init == "ones":
        return torch.ones(piece.global_shape)
    gen = torch.Generator().manual_seed(name_seed(seed, name))
    return torch.empty(piece.global_shape).normal_(0.0, piece.std, generator=gen)


# --- a slice of a normal_ draw without the whole draw ------------------------------------------
# torch's CPU ``normal_`` on a contiguous fp32 tensor of n >= 16 elements draws n uniforms in
# order (one 32-bit word each, as ``uniform_`` does), turns each aligned group of 16 into 16
# normals (Box-Muller within the group), and when n % 16 != 0 draws 16 more uniforms and
# recomputes the last 16 elements from them. So element i depends only on the uniforms of its
# group: a rank can skip the uniforms before its slice (``uniform_``, no log/sin), draw its
# groups in chunks, stop after its slice (bar the tail), and hold a chunk, not the tensor.
# `_stream_is_exact` checks this against the whole draw once per process and falls back to
# whole draws if a torch build behaves otherwise.
SCRATCH_ELEMENTS = 1 << 22  # fp32 elements of scratch the streamed init holds at once (16 MB)
scratch_peak = [0]  # the largest scratch tensor it allocated, in elements (read by tests and the bench)


def _scratch(numel: int) -> torch.Tensor:
    scratch_peak[0] = max(scratch_peak[0], numel)
    return torch.empty(numel)


class _NormalStream:
    """Reads increasing, 16-aligned flat ranges of ``torch.empty(n).normal_(0, std, generator=gen)``."""

    def __init__(self, gen: torch.Generator, n: int, std: float, chunk: int) -> None:
        self.gen, self.n, self.std, self.chunk = gen, n, std, max(16, chunk // 16 * 16)
        self.main = n // 16 * 16  # elements the group loop writes; the rest only the tail does
        self.pos = 0  # uniforms consumed so far

    def _skip(self, count: int) -> None:
        while count > 0:
            step = min(count, self.chunk)
            _scratch(step).uniform_(generator=self.gen)
            count -= step

    def read(self, lo: int, hi: int) -> torch.Tensor:
        """Flat elements [lo, hi) of the draw; ``lo`` at or past the previous ``hi``, 16-aligned
        unless it is the first read."""
        out = torch.empty(hi - lo)
        body = min(hi, self.main)
        if lo < body:
            start = lo // 16 * 16
            assert start >= self.pos, "stream reads must not go back"
            self._skip(start - self.pos)
            self.pos = start
            while self.pos < body:
                step = min(self.chunk, -(-(body - self.pos) // 16) * 16)
                values = _scratch(step).normal_(0.0, self.std, generator=self.gen)
                a, b = max(lo, self.pos), min(body, self.pos + step)
                out[a - lo : b - lo] = values[a - self.pos : b - self.pos]
                self.pos += step
        if self.n % 16 and hi > self.n - 16:  # the recomputed last 16 overwrite the groups' values
            self._skip(self.n - self.pos)
            self.pos = self.n
            last = _scratch(16).normal_(0.0, self.std, generator=self.gen)
            a = max(lo, self.n - 16)
            out[a - lo :] = last[a - (self.n - 16) : hi - (self.n - 16)]
        return out


def _streamed_slice(seed: int, name: str, piece: Piece, chunk: int) -> torch.Tensor:
    """``full_init_value(seed, name, piece).narrow(piece.dim, piece.start, piece.length)``,
    drawn through `_NormalStream` (a normal piece of at least 16 elements)."""
    shape = piece.global_shape
    n = math.prod(shape)
    row = n // shape[0]  # elements per index of dim 0
    stream = _NormalStream(torch.Generator().manual_seed(name_seed(seed, name)), n, piece.std, chunk)
    if piece.dim == 0:  # one flat range; the rows after it are never drawn (bar the tail)
        flat = stream.read(piece.start * row, (piece.start + piece.length) * row)
        return flat.view(piece.length, *shape[1:])
    # Every row holds part of the slice: read whole rows in 16-aligned chunks, keep the slice.
    group = 16 // math.gcd(row, 16)  # rows per 16-aligned boundary
    rows = max(group, chunk // max(row, 1) // group * group)
    bounds = [b for b in range(rows, shape[0], rows) if b * row <= n - 16] + [shape[0]]
    local = list(shape)
    local[piece.dim] = piece.length
    out = torch.empty(local)
    lo = 0
    for hi in bounds:
        block = stream.read(lo * row, hi * row).view(hi - lo, *shape[1:])
        out[lo:hi] = block.narrow(piece.dim, piece.start, piece.length)
        lo = hi
    return out


_exact: list[bool] = []


def _stream_is_exact() -> bool:
    """Once per process: streamed slices of a few awkward shapes equal slices of whole draws."""
    if not _exact:
        ok = True
        for shape, dim, start, length in [((37, 53), 0, 11, 13), ((37, 53), 1, 7, 20), ((40, 8), 0, 38, 2), ((5, 7), 1, 0, 7)]:
            piece = Piece("probe", shape, dim, start, length, 0, std=0.5)
            want = full_init_value(1, "probe", piece).narrow(dim, start, length)
            ok = ok and torch.equal(_streamed_slice(1, "probe", piece, chunk=48), want)
        if not ok:
            warnings.warn("this torch's CPU normal_ does not split into groups of 16; initialising from whole tensors")
        _exact.append(ok)
    return _exact[0]


def init_slice(seed: int, name: str, piece: Piece, chunk: int = SCRATCH_ELEMENTS) -> torch.Tensor:
    """This rank's slice of global tensor `name`, bitwise equal to slicing `full_init_value`,
    with at most `chunk` scratch elements (plus the slice) in memory: no full tensor."""
    shape = piece.global_shape
    local = list(shape)
    local[piece.dim] = piece.length
    if piece.init == "zeros":
        return torch.zeros(local)
    if piece.init == "ones":
        return torch.ones(local)
    if math.prod(shape) <= chunk or not _stream_is_exact():  # small: the whole draw is the cheap way
        full = full_init_value(seed, name, piece)
        scratch_peak[0] = max(scratch_peak[0], full.numel())
        return full.narrow(piece.dim, piece.start, piece.length).clone()
    return _streamed_slice(seed, name, piece, chunk)


@torch.no_grad()
def init_parameters(module: nn.Module, seed: int, chunk: int = SCRATCH_ELEMENTS) -> None:
    """Fill every parameter with its slices of the layout-independent global values.

    Padding (local rows that no piece covers) is zeroed. Works on parameters created on
    any device; values are generated on CPU in fp32 (one slice, plus `chunk` elements of
    scratch, at a time) and then copied over.
    """
    for name, param in module.named_parameters():
        param.zero_()
        for piece in pieces_of(param, name.rpartition(".")[2]):
            value = init_slice(seed, global_name(name, piece), piece, chunk)
            param.narrow(piece.dim, piece.local_start, piece.length).copy_(value)


@torch.no_grad()
def load_full(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy this rank's slices out of full-shape global tensors (absent names are an error)."""
    for name, param, gname, piece in iter_pieces(module):
        if gname not in tensors:
            raise KeyError(f"global tensor {gname!r} (for parameter {name}) is missing")
        full = tensors[gname]
        if tuple(full.shape) != piece.global_shape:
            raise ValueError(f"global tensor {gname!r} has shape {tuple(full.shape)}, expected {piece.global_shape}")
        local = param.narrow(piece.dim, piece.local_start, piece.length)
        local.copy_(full.narrow(piece.dim, piece.start, piece.length))


@torch.no_grad()
def gather_full(
    module: nn.Module,
    group: dist.ProcessGroup | None,
    grads: bool = False,
    names: dict[str, tuple[int, ...]] | None = None,
) -> dict[str, torch.Tensor]:
    """Reassemble full-shape fp32 global tensors (or their gradients) over `group`.

    Every rank writes its slices into zeros and the results are summed, together with a
    count of writers per element so replicated slices are averaged, not multiplied
    (a test and export tool: it holds two full-size fp32 copies). With
    `names` (global name -> shape, the same on every rank) the ranks of `group` may hold
    different tensors, e.g. a whole pipeline; absent tensors are all-zero locally.
    """
    shapes = names if names is not None else global_shapes(module)
    full = {n: torch.zeros(s, dtype=torch.float32) for n, s in shapes.items()}
    counts = {n: torch.zeros(s, dtype=torch.float32) for n, s in shapes.items()}
    for _, param, gname, piece in iter_pieces(module):
        src = param.grad if grads else param
        if src is None:
            continue
        value = src.detach().float().cpu().narrow(piece.dim, piece.local_start, piece.length)
        full[gname].narrow(piece.dim, piece.start, piece.length).add_(value)
        counts[gname].narrow(piece.dim, piece.start, piece.length).add_(1.0)
    if group_size(group) > 1:
        device = group_device(group)
        for gname in sorted(full):
            t, c = full[gname].to(device), counts[gname].to(device)
            all_reduce(t, group)
            all_reduce(c, group)
            full[gname], counts[gname] = t.cpu(), c.cpu()
    for gname, t in full.items():
        full[gname] = t / counts[gname].clamp_min(1.0)
    return full

