"""How each local parameter maps onto named global tensors, and layout-free initialisation.

A local parameter is a concatenation, along one dimension, of slices of global tensors
(its `Piece`s). A column-parallel weight is one piece (my rows of ``weight``); a fused
QKV weight is three (my rows of ``q.weight``, ``k.weight`` and ``v.weight``); a
vocabulary shard may be followed by padding rows that belong to no global tensor.

That one description serves three jobs:

* initialisation: the full value of every global tensor depends only on the seed and the
  tensor's global name (a generator seeded from both), and each rank copies its slices,
  so a model sharded at any tp, split at any pp, is exactly the slices of the
  single-process model;
* gathering to full shape (tests, export) and loading from full tensors;
* checkpoints, which store tensors by global name and slice.
"""

from __future__ import annotations

import hashlib
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
    """The full fp32 value of global tensor `name`: a function of (seed, name) alone."""
    if piece.init == "zeros":
        return torch.zeros(piece.global_shape)
    if piece.init == "ones":
        return torch.ones(piece.global_shape)
    gen = torch.Generator().manual_seed(name_seed(seed, name))
    return torch.empty(piece.global_shape).normal_(0.0, piece.std, generator=gen)


@torch.no_grad()
def init_parameters(module: nn.Module, seed: int) -> None:
    """Fill every parameter with its slices of the layout-independent global values.

    Padding (local rows that no piece covers) is zeroed. Works on parameters created on
    any device; values are generated on CPU in fp32 and then copied over.
    """
    for name, param in module.named_parameters():
        param.zero_()
        for piece in pieces_of(param, name.rpartition(".")[2]):
            gname = global_name(name, piece)
            value = full_init_value(seed, gname, piece).narrow(piece.dim, piece.start, piece.length)
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

