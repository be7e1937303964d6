"""Every collective the model uses, as a small autograd function with its conjugate.

Tensor parallelism is these few functions plus ordinary local math. Each one's backward
is the communication that its forward implies for the gradient:

    copy_to_tp            forward: identity             backward: all-reduce
    reduce_from_tp        forward: all-reduce           backward: identity
    scatter_to_tp         forward: keep my last-dim chunk   backward: all-gather last dim
    gather_from_tp        forward: all-gather last dim  backward: keep my chunk
    scatter_to_sp         forward: keep my sequence chunk   backward: all-gather sequence
    gather_from_sp        forward: all-gather sequence  backward: reduce-scatter sequence
    reduce_scatter_to_sp  forward: reduce-scatter sequence  backward: all-gather sequence

Activations are batch-first, ``[batch, seq, ...]``, so the sequence dimension is 1.
A ``None`` group (or a group of one) makes every function the identity.
"""

from __future__ import annotations

import torch

from trident.parallel.collectives import Group, all_gather_dim, all_reduce, reduce_scatter_dim
from trident.parallel.topology import group_rank, group_size

SEQ_DIM = 1


def split_dim(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """This rank's chunk of `x` along `dim` (no communication)."""
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n != 0:
        raise ValueError(f"split of size {x.shape[dim]} along dim {dim} over {n} ranks does not divide")
    return x.chunk(n, dim=dim)[group_rank(group)].contiguous()


# --- autograd functions ------------------------------------------------------------------
class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # never reduce in place: autograd may hand the same gradient tensor to other branches
        return all_reduce(grad.clone(memory_format=torch.contiguous_format), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        return all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return split_dim(x, -1, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_gather_dim(grad, -1, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return all_gather_dim(x, -1, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return split_dim(grad, -1, ctx.group), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return split_dim(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_gather_dim(grad, SEQ_DIM, ctx.group), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return all_gather_dim(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank's copy of the full sequence fed a different weight shard, so the
        # gradient of my sequence chunk is the sum of all ranks' contributions to it.
        return reduce_scatter_dim(grad, SEQ_DIM, ctx.group), None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return reduce_scatter_dim(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_gather_dim(grad, SEQ_DIM, ctx.group), None


def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ScatterToTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _GatherFromTP.apply(x, group)


def scatter_to_sp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ScatterToSP.apply(x, group)


def gather_from_sp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _GatherFromSP.apply(x, group)


def reduce_scatter_to_sp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceScatterToSP.apply(x, group)
