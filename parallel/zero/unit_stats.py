"""What ZeRO-3's sharded parameters report about themselves: per-rank bytes and the
communication a step waited for (`trident.parallel.zero.sharded_params.ShardedParams`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from trident.parallel.zero.sharded_params import ShardedParams


def exposed_wait_s(events: list[tuple[float, str, str]]) -> float:
    """Seconds the step waited for its collectives (the communication not hidden behind
    compute), from the recorded ``*_wait`` / ``*_waited`` pairs."""
    starts = [t for t, what, _ in events if what.endswith("_wait")]
    ends = [t for t, what, _ in events if what.endswith("_waited")]
    return sum(e - s for s, e in zip(starts, ends))


def memory(sp: "ShardedParams") -> dict[str, int]:
    """Per-rank bytes: persistent parameter and gradient shards, and what a step adds at most
    (the largest unit gathered -- a block with its experts' unit --, twice with prefetch; its
    fp32 gradient while the reduce-scatters are in flight)."""
    units = sp.buckets
    numel = sum(u.numel for u in units)
    used = sum(u.used for u in units)
    shard = sum(u.shard_end - u.shard_start for u in units)
    largest = max(sum(e.numel for e in sp._with_experts(u)) for u in units if not u.expert)
    elem = torch.empty((), dtype=sp.param_dtype).element_size()
    gathered = largest * (2 if sp.prefetch and sp.dp > 1 else 1) if sp.reshard_after_forward else numel
    return {
        "numel": used, "padded_numel": numel, "padding": numel - used, "shard_numel": shard,
        "buckets": len(units), "param_bytes": shard * elem, "param_peak_bytes": (shard + gathered) * elem,
        "grad_bytes": shard * 4, "grad_peak_bytes": shard * 4 + largest * 4 * (1 + sp.in_flight),
    }
