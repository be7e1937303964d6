"""Plain collectives (no autograd) and the facts every caller of one needs.

One home for what was written at each call site before: which device a collective's
tensors must live on (NCCL wants CUDA tensors, gloo wants CPU ones), the any-rank flag,
a coalesced all-reduce of many small tensors, and the shim over torch's renamed
tensor-in/tensor-out collectives. The autograd functions of tensor parallelism
(`trident.parallel.tensor.mappings`) are built on these.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from trident.parallel.topology import Topology, group_size

Group = dist.ProcessGroup | None

# torch 2.13 renamed the tensor-in/tensor-out collectives; older releases have the old names.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def comm_device(topo: Topology) -> torch.device:
    """Where this rank's collective tensors live: its GPU under NCCL, the CPU under gloo."""
    return topo.device if topo.device.type == "cuda" else torch.device("cpu")


def group_device(group: Group) -> torch.device:
    """The same fact for code that holds only a process group (no topology)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(x: torch.Tensor, group: Group, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of `x` over `group`; the identity for a group of one."""
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def all_reduce_coalesced(tensors: list[torch.Tensor], group: Group) -> None:
    """Sum many tensors over `group` with one collective (one flat copy, not one call each)."""
    if not tensors or group_size(group) == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def any_rank(flag: bool, topo: Topology) -> bool:
    """True on every rank if `flag` is true on any rank of the job (tp, cp, pp and dp).

    The groups tile the world, so one all-reduce over the default group covers them all.
    """
    if topo.world == 1 or not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=comm_device(topo))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_gather_dim(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` (rank order)."""
    n = group_size(group)
    if n == 1:
        return x
    x = x.movedim(dim, 0).contiguous()
    out = torch.empty((n * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    all_gather_single(out, x, group=group)
    return out.movedim(0, dim)


def reduce_scatter_dim(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Sum over ranks, then keep this rank's chunk along `dim`."""
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n != 0:
        raise ValueError(f"reduce-scatter of size {x.shape[dim]} along dim {dim} over {n} ranks does not divide")
    x = x.movedim(dim, 0).contiguous()
    out = torch.empty((x.shape[0] // n,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    reduce_scatter_single(out, x, group=group)
    return out.movedim(0, dim)
