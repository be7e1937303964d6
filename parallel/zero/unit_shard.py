"""One ZeRO-3 unit: its parameters flattened, padded and sharded over the ranks that hold it.

`ShardedParams` gathers and frees units; this module only lays one out. A unit is a
`GradBuffer` bucket holding exactly one unit's parameters (so the optimizer, the gradient
norm and the state files see ZeRO-3's units as they see ZeRO 1/2's buckets), plus the
rank's persistent shard of the parameters and the state of its gather.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trident.errors import UserError
from trident.parallel.tensor.sharding import is_expert, is_pipeline_tied, is_tp_partial, mark_zero3_sharded
from trident.parallel.zero.grad_buffer import ALIGN, Bucket, Slot


@dataclass
class Unit(Bucket):
    """A bucket holding exactly one unit's parameters, with its persistent shard."""

    name: str = ""
    shard: torch.Tensor | None = None  # [numel/dp] model dtype: this rank's parameters, always held
    gathered: bool = False  # do the parameters point at a full, gathered `param_data`?
    gather_work: Any = None  # an all-gather in flight (a prefetch)
    tp_partial: list[tuple[int, int]] = field(default_factory=list)  # owned ranges summed over tp at the end
    tied: bool = False  # a pipeline-tied embedding: the whole shard is summed over the embedding group
    keep: bool = False  # stays gathered: the next action starts with this unit (`UnitOrder`)
    splits: bool = False  # learned: its weight gradients come in a W after its B (zero-bubble schedules)
    parked: dict[int, torch.Tensor] = field(default_factory=dict)  # slot start -> fp32 gradient from a B

    def park(self, start: int, grad: torch.Tensor) -> None:
        """Keep a gradient a split backward's B made (a norm's, a bias's) in fp32 on its own,
        added over microbatches, until the unit's W brings the rest (`gradient`)."""
        flat = grad.reshape(-1).to(torch.float32, copy=True)
        self.parked[start] = flat if start not in self.parked else self.parked[start].add_(flat)

    def gradient(self) -> torch.Tensor:
        """The unit's fp32 gradient for this microbatch (``grad_data``), made on first use,
        with what was parked folded in."""
        if self.grad_data is None:
            self.grad_data = torch.zeros(self.numel, dtype=torch.float32, device=self.main_grad.device)
            for start, grad in self.parked.items():
                self.grad_data[start : start + grad.numel()].add_(grad)
            self.parked.clear()
        return self.grad_data


def make_unit(index: int, name: str, params: list[tuple[str, nn.Parameter]], dp: int, dp_rank: int, group: Any,
              dtype: torch.dtype, device: torch.device, tp: int) -> Unit:
    """Copy the unit's parameters into a flat buffer padded to a multiple of ``dp * ALIGN``
    (a unit dp does not divide is padded, never refused), keep this rank's 1/dp of it, and
    allocate the persistent gathered buffer (`ShardedParams` shrinks its storage until a
    gather). The parameters still hold their values: the caller frees them."""
    used = sum(p.numel() for _, p in params)
    numel = -(-used // (dp * ALIGN)) * (dp * ALIGN)
    flat = torch.zeros(numel, dtype=dtype, device=device)
    unit = Unit(index, [], numel, used, False, None, 0, numel, dp=dp, dp_rank=dp_rank, group=group,
                expert=is_expert(params[0][1]), name=name)
    offset = 0
    for pname, p in params:
        flat[offset : offset + p.numel()].copy_(p.detach().reshape(-1))
        unit.slots.append(Slot(pname, p, index, offset, p.numel(), is_tp_partial(p) and tp > 1))
        offset += p.numel()
    share = numel // dp
    unit.shard_start, unit.shard_end = dp_rank * share, (dp_rank + 1) * share
    unit.shard = flat[unit.shard_start : unit.shard_end].clone()
    unit.main_grad = torch.zeros(share, dtype=torch.float32, device=device)
    unit.tied = any(is_pipeline_tied(p) for _, p in params)
    if unit.tied and len(params) > 1:
        raise UserError(f"unit {name!r} mixes a pipeline-tied embedding with other parameters; give it its own unit")
    for slot in unit.slots:
        lo, hi = max(slot.start, unit.shard_start), min(slot.start + slot.numel, unit.shard_end)
        if slot.deferred and lo < hi:
            unit.tp_partial.append((lo - unit.shard_start, hi - unit.shard_start))
        mark_zero3_sharded(slot.param)
    unit.param_data = torch.empty(numel, dtype=dtype, device=device)  # kept; its storage is resized
    return unit
