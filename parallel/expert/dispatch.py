"""Expert parallelism: send each routed row to the rank holding its expert, and back.

Under ``parallel.ep`` the E experts of an MoE layer are split over the ep ranks of an
expert-parallel group (`Topology.ep_group`): rank r holds experts [r*El, (r+1)*El), El =
E/ep. After `trident.model.moe.permute` a rank holds ``x_sorted`` [N, h], its own tokens'
(token, choice) rows grouped by *global* expert, and ``counts`` [E]. Then, as in
Megatron-Core's all-to-all dispatcher:

1. `plan`: one all-to-all of ``counts`` (El numbers to each rank) tells every rank how many
   rows each source sends to each of its local experts. Variable-size all-to-all needs the
   splits as host integers, so they come to the CPU here: the one host synchronisation of a
   dropless MoE step (Megatron's dropless dispatcher has the same one).
2. `dispatch`: ``all_to_all_single`` of the rows with those splits. What arrives is grouped
   by source rank, then by local expert; a stable regroup makes it expert-major (within an
   expert: source rank, then the source's own order), which is what the experts' grouped
   matmul needs.
3. `combine`: the exact inverse (un-regroup, all-to-all back with the splits swapped), so
   the rows come home in ``x_sorted`` order for `unpermute`.

The all-to-all is differentiable: its backward is the same exchange with the splits
swapped, so gradients of the expert inputs travel back to the tokens' ranks and the expert
weights' gradients stay with the experts (summed over tokens of the whole ep group; the
gradient buffer then sums them over the expert-data-parallel group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from trident.parallel.collectives import Group


@dataclass
class Route:
    """Where this rank's rows go and what it receives, for one MoE layer's microbatch."""

    send: list[int]  # rows to each ep rank (host ints: the all-to-all's split sizes)
    recv: list[int]  # rows from each ep rank
    order: torch.Tensor  # [R] int64: received rows in expert-major order (indices into what arrived)
    inverse: torch.Tensor  # [R] int64: the inverse permutation of `order`
    local_counts: torch.Tensor  # [El] rows per local expert, over every source

    def bytes_sent(self, me: int, row_bytes: int) -> int:
        """Bytes this rank sends to other ranks in the dispatch and the combine together (the
        combine returns what the dispatch brought in); their backward sends exactly as much."""
        return (sum(self.send) - self.send[me] + sum(self.recv) - self.recv[me]) * row_bytes


def plan(counts: torch.Tensor, group: Group, ep: int) -> Route:
    """Exchange the per-expert row counts over the ep group (collective) and derive the route."""
    # counts: [E] rows of x_sorted per global expert  ->  Route
    el = counts.numel() // ep
    counts = counts.to(torch.int64).contiguous()
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)  # El numbers to and from each rank
    by_source = received.view(ep, el)  # [ep, El]: rows from source s for local expert j
    send = counts.view(ep, el).sum(1).tolist()  # the host sync (split sizes must be ints)
    recv = by_source.sum(1).tolist()
    expert_of_row = torch.arange(el, device=counts.device).repeat(ep).repeat_interleave(by_source.reshape(-1))
    order = torch.argsort(expert_of_row, stable=True)  # [R]
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return Route(send, recv, order, inverse, by_source.sum(0))


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], group: Group) -> torch.Tensor:
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Rows to the ranks of `group` by `send` sizes; backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group: Group) -> torch.Tensor:  # type: ignore[override]
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _exchange(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _exchange(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def dispatch(x_sorted: torch.Tensor, route: Route, group: Group) -> torch.Tensor:
    """This rank's rows to their experts' ranks; returns the rows of its local experts, expert-major."""
    # x_sorted: [N, h] grouped by global expert  ->  [R, h] grouped by local expert
    arrived = _AllToAll.apply(x_sorted, route.send, route.recv, group)  # [R, h] source-major
    return arrived.index_select(0, route.order)


def combine(y_local: torch.Tensor, route: Route, group: Group) -> torch.Tensor:
    """The inverse of `dispatch`: the local experts' outputs back to the ranks their rows came from."""
    # y_local: [R, h] expert-major  ->  [N, h] in this rank's x_sorted order
    return _AllToAll.apply(y_local.index_select(0, route.inverse), route.recv, route.send, group)
