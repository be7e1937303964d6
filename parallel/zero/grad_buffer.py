"""Contiguous parameter and gradient buffers, reduced over data parallelism in buckets.

Every trainable parameter of this rank's model gets a slot in one of a few *buckets*:
flat tensors of about `bucket_size` elements, filled in reverse parameter order (roughly
the order in which backward produces gradients). Each bucket has

* a parameter buffer in the model dtype; the parameters become views into it, so the
  ZeRO all-gather of updated parameters writes straight into the model;
* an fp32 gradient buffer; a hook after each parameter's gradient accumulation
  (`register_post_accumulate_grad_hook`) adds ``param.grad`` into it and frees
  ``param.grad``, so microbatches accumulate in fp32 whatever the compute dtype.

Reduction happens once per global batch. Before each microbatch's backward the caller
says whether it is the last one (`before_backward(mb, is_last)`, the pipeline executor's
hook; a caller that never says so gets every backward treated as the last). During the
last backward, as soon as every parameter of a bucket has its gradient the bucket's
collective is launched asynchronously, so communication overlaps the rest of the
backward; `finish_grad_sync()` (the executor's ``grad_sync`` hook) launches whatever is
left and waits. Buckets are always launched in index order, so every rank issues the
same collectives in the same order even if its hooks fire in a different one.

* zero 0: all-reduce the bucket; every rank ends with the full reduced gradient.
* zero 1: reduce-scatter; rank r of the dp group keeps the r-th contiguous 1/dp slice of
  every bucket (buckets are padded to a multiple of dp). The full buffer stays allocated.
* zero 2: as zero 1, but the full gradient buffer is freed after the reduction and only
  the owned slices persist (they are re-allocated at the first gradient of the next step).

Averaging convention: the gradients are SUMMED over dp, never averaged. The loss that is
back-propagated is already normalised by the number of loss-bearing tokens of the whole
global batch (`trident.parallel.pipeline.executor`), so the sum over microbatches and replicas is
exactly the gradient of the global-batch mean, and dp=4 equals dp=1 on the same batch.

Deferred parameters. Two kinds of gradient are partial sums that the pipeline's
`finalize_grads` completes on ``param.grad`` after the last backward and before
``grad_sync``: tensor-parallel partial gradients (sequence-parallel norms, QK-norm) and
the two copies of a pipeline-split tied embedding. Those parameters live in their own
trailing buckets and accumulate in fp32 like every other gradient; the buffer points
their ``main_grad`` (`trident.parallel.tensor.sharding.MAIN_GRAD`) at their fp32 slice,
finalisation sums that in place, and `finish_grad_sync` reduces their buckets after it
(a reduce-scatter must see the whole, finalised gradient of a tensor). Before, they went
back to the compute dtype for the last backward and the sums: a bf16 model rounded them,
an fp16 one could overflow.

Expert parameters (expert parallelism, `trident.parallel.tensor.sharding.is_expert`) are
held by the dp/ep ranks of their expert-data-parallel group only, so they get buckets of
their own, reduced and ZeRO-sharded over that group; a bucket carries its group. Each run
of parameters of one kind is cut into its own bucket, in the same reverse order, so every
dp rank still has the same sequence of buckets and issues its collectives in one order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from trident.errors import UserError
from trident.parallel.collectives import all_gather_single, group_device, reduce_scatter_single
from trident.parallel.tensor.sharding import is_expert, is_pipeline_tied, is_tp_partial, set_main_grad
from trident.parallel.topology import Topology

ALIGN = 16  # elements; each rank's shard of a bucket starts on a 64-byte boundary


@dataclass
class Slot:
    """Where one parameter lives: elements [start, start + numel) of bucket `bucket`."""

    name: str
    param: nn.Parameter
    bucket: int
    start: int
    numel: int
    deferred: bool


@dataclass
class Bucket:
    index: int
    slots: list[Slot]
    numel: int  # padded to a multiple of dp * ALIGN
    used: int  # elements that belong to parameters; the rest is padding
    deferred: bool
    param_data: torch.Tensor  # [numel], model dtype; parameters are views into it
    shard_start: int  # this rank's owned range [shard_start, shard_end) (all of it at zero 0)
    shard_end: int
    grad_data: torch.Tensor | None = None  # [numel] fp32, None while freed (zero 2)
    main_grad: torch.Tensor | None = None  # the reduced gradient of [shard_start, shard_end)
    ready: set[int] = field(default_factory=set)
    launched: bool = False
    work: object = None
    scatter_out: torch.Tensor | None = None
    # the ranks this bucket is reduced and sharded over: dp x cp, or the expert-data-parallel
    # group for expert parameters; `dp_rank` is this rank's place in it
    dp: int = 1
    dp_rank: int = 0
    group: dist.ProcessGroup | None = None
    expert: bool = False


def check_same_layout(buckets: list[Bucket], group: dist.ProcessGroup | None, dp: int) -> None:
    """Every rank of the dp group must have the same buckets, or their collectives would not
    match (a hang or silent garbage); checked once, before any is issued."""
    if dp == 1:
        return
    sig = float(sum((i + 1) * b.numel for i, b in enumerate(buckets)) + 1e9 * len(buckets))
    t = torch.tensor([sig, -sig], dtype=torch.float64, device=group_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    if t[0].item() != -t[1].item():
        raise UserError(
            "the ranks of a dp group hold differently shaped models (their gradient buckets differ); "
            "every dp replica must build the same model with the same bucket size"
        )


class GradBuffer:
    """Parameter and fp32 gradient buffers of one model chunk, with bucketed dp reduction.

    Build it after the model is on its device and initialised (the parameters are moved
    into the buffers here). The optimizer reads ``bucket.main_grad`` over
    ``[shard_start, shard_end)`` after `finish_grad_sync`.
    """

    def __init__(
        self,
        model: nn.Module,
        topo: Topology,
        zero: int = 0,
        bucket_size: int = 10_000_000,
        overlap: bool = True,
    ) -> None:
        if zero not in (0, 1, 2):
            raise UserError(f"zero stage {zero!r} is not supported; valid values are 0, 1, 2")
        if not isinstance(bucket_size, int) or bucket_size < 1:
            raise UserError(f"bucket size {bucket_size!r} must be a whole number of elements >= 1")
        self.topo, self.zero, self.overlap = topo, zero, overlap
        # the ranks holding the same weights: dp, times cp under context parallelism (cp
        # ranks see different tokens of the same samples, so their gradients are summed too)
        self.dp = topo.dp_cp
        self.dp_rank = topo.dp_cp_rank
        self.group = topo.dp_cp_group
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise UserError("the model has no trainable parameters to optimise")
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) != 1:
            raise UserError(f"all trainable parameters must share one dtype, found {sorted(map(str, dtypes))}")
        self.param_dtype = dtypes.pop()
        self.device = named[0][1].device

        def deferred(p: nn.Parameter) -> bool:
            return (is_tp_partial(p) and topo.tp > 1) or is_pipeline_tied(p)

        # Reverse order approximates the order backward produces gradients in; deferred
        # parameters go last because they are reduced only after finalisation.
        order = list(reversed(named))
        groups = [[(n, p) for n, p in order if not deferred(p)], [(n, p) for n, p in order if deferred(p)]]
        self.buckets: list[Bucket] = []
        self.slots: dict[int, Slot] = {}  # id(param) -> slot
        for is_deferred, params in zip((False, True), groups):
            current: list[tuple[str, nn.Parameter]] = []
            for n, p in params:
                if current and is_expert(p) != is_expert(current[0][1]):  # a bucket reduces over one group
                    self._make_bucket(current, is_deferred)
                    current = []
                current.append((n, p))
                if sum(q.numel() for _, q in current) >= bucket_size:
                    self._make_bucket(current, is_deferred)
                    current = []
            if current:
                self._make_bucket(current, is_deferred)
        self._check_same_layout()

        self._armed = True  # is the coming backward the last one of the step?
        self._next_launch = 0
        self._synced = False
        self._hooks = [
            slot.param.register_post_accumulate_grad_hook(self._make_hook(slot)) for slot in self.slots.values()
        ]

    # --- construction -----------------------------------------------------------------------
    def _make_bucket(self, params: list[tuple[str, nn.Parameter]], is_deferred: bool) -> None:
        index = len(self.buckets)
        used = sum(p.numel() for _, p in params)
        expert = is_expert(params[0][1])
        dp, dp_rank, group = (
            (self.topo.edp, self.topo.edp_rank, self.topo.edp_group) if expert else (self.dp, self.dp_rank, self.group)
        )
        multiple = dp * ALIGN
        numel = -(-used // multiple) * multiple
        param_data = torch.zeros(numel, dtype=self.param_dtype, device=self.device)
        slots, offset = [], 0
        for name, p in params:
            n = p.numel()
            view = param_data[offset : offset + n]
            view.copy_(p.detach().reshape(-1))
            # the parameter now lives in the bucket, so an all-gather into the bucket
            # updates the model without a copy
            p.data = view.view_as(p)
            slot = Slot(name, p, index, offset, n, is_deferred)
            slots.append(slot)
            self.slots[id(p)] = slot
            offset += n
        if self.zero == 0:
            start, end = 0, numel
        else:
            shard = numel // dp
            start, end = dp_rank * shard, (dp_rank + 1) * shard
        bucket = Bucket(index, slots, numel, used, is_deferred, param_data, start, end,
                        dp=dp, dp_rank=dp_rank, group=group, expert=expert)
        if self.zero < 2:
            bucket.grad_data = torch.zeros(numel, dtype=torch.float32, device=self.device)
        self.buckets.append(bucket)

    def _check_same_layout(self) -> None:
        check_same_layout(self.buckets, self.group, self.dp)
        experts = [b for b in self.buckets if b.expert]
        if experts:
            check_same_layout(experts, experts[0].group, experts[0].dp)

    def owned_params(self, b: Bucket) -> torch.Tensor:
        """This rank's owned range of bucket `b`'s parameters (the fp32 master of an fp32 model)."""
        return b.param_data[b.shard_start : b.shard_end]

    # --- the backward protocol -----------------------------------------------------------------
    def before_backward(self, mb: int, is_last: bool) -> None:
        """Called before each microbatch's backward (the pipeline executor's hook).

        Only the last backward of a step launches reductions; earlier ones accumulate.
        """
        self._armed = is_last

    def _make_hook(self, slot: Slot) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            if param.grad is None:
                return
            b = self.buckets[slot.bucket]
            if b.launched or self._synced:
                raise RuntimeError(
                    f"a gradient for {slot.name} arrived after its bucket's dp reduction was launched: "
                    f"call before_backward(mb, is_last=False) before every backward but the last of a "
                    f"step, and zero_grad() before the next step"
                )
            grad = self._grad_data(b)
            grad[slot.start : slot.start + slot.numel].add_(param.grad.reshape(-1))
            param.grad = None
            if slot.deferred:  # finalize_grads sums it there, in fp32; start_grad_sync launches it
                set_main_grad(param, grad[slot.start : slot.start + slot.numel].view_as(param))
            elif self._armed:
                if slot.start in b.ready:
                    raise RuntimeError(f"{slot.name} received two gradients in the last backward of a step")
                b.ready.add(slot.start)
                if self.overlap:
                    self._launch_ready()

        return hook

    def _grad_data(self, b: Bucket) -> torch.Tensor:
        if b.grad_data is None:  # zero 2 frees it after each reduction
            b.grad_data = torch.zeros(b.numel, dtype=torch.float32, device=self.device)
        return b.grad_data

    def _launch_ready(self) -> None:
        while self._next_launch < len(self.buckets):
            b = self.buckets[self._next_launch]
            if b.deferred or len(b.ready) < len(b.slots):
                return
            self._launch(b)

    def _launch(self, b: Bucket) -> None:
        data = self._grad_data(b)
        if b.dp > 1:
            if self.zero == 0:
                b.work = dist.all_reduce(data, group=b.group, async_op=True)
            else:
                b.scatter_out = torch.empty(b.shard_end - b.shard_start, dtype=torch.float32, device=self.device)
                b.work = reduce_scatter_single(b.scatter_out, data, group=b.group, async_op=True)
        b.launched = True
        self._next_launch = b.index + 1

    def start_grad_sync(self) -> None:
        """Launch every bucket not launched yet (all of them without overlap), in order.

        Deferred parameters' gradients are taken from ``param.grad`` here, so call this
        after `finalize_grads`.
        """
        if self._synced:
            return
        for b in self.buckets:
            if b.deferred:
                for slot in b.slots:
                    p = slot.param
                    set_main_grad(p, None)  # a view of a buffer zero 2 frees after the reduction
                    if p.grad is not None:  # e.g. a tied copy that received no gradient: zeros
                        self._grad_data(b)[slot.start : slot.start + slot.numel].add_(p.grad.reshape(-1))
                        p.grad = None
        for b in self.buckets[self._next_launch :]:
            self._launch(b)

    def finish_grad_sync(self) -> None:
        """Complete the dp reduction (the executor's ``grad_sync``); idempotent per step.

        Afterwards ``bucket.main_grad`` holds the summed gradient of this rank's range.
        """
        if self._synced:
            return
        self.start_grad_sync()
        for b in self.buckets:
            if b.work is not None:
                self.topo.heartbeat.waiting("dp reduce-scatter bucket" if self.zero else "dp all-reduce bucket",
                                            b.index)
                b.work.wait()
                b.work = None
            data = b.grad_data
            lo, hi = b.shard_start, b.shard_end
            if self.zero == 0:
                b.main_grad = data
            elif self.zero == 1:
                if b.scatter_out is not None:
                    data[lo:hi].copy_(b.scatter_out)
                b.main_grad = data[lo:hi]
            else:
                # keep only the owned slice; the full buffer goes back to the allocator
                b.main_grad = b.scatter_out if b.scatter_out is not None else data[lo:hi].clone()
                b.grad_data = None
            b.scatter_out = None
        self._synced = True

    def zero_grad(self) -> None:
        """Start a new step: clear gradients and the reduction state."""
        if any(b.work is not None for b in self.buckets):
            self.finish_grad_sync()  # never leave a collective in flight on a buffer we zero
        for b in self.buckets:
            if b.grad_data is not None:
                b.grad_data.zero_()
            if self.zero == 2:
                b.grad_data = None
            b.main_grad = None
            b.ready.clear()
            b.launched = False
            for slot in b.slots:
                slot.param.grad = None
                set_main_grad(slot.param, None)
        self._armed, self._synced, self._next_launch = True, False, 0

    # --- parameters ----------------------------------------------------------------------------
    def gather_params(self, shards: list[torch.Tensor]) -> None:
        """Write each bucket's owned range from `shards` (fp32) and all-gather the rest.

        At zero 0 (or dp = 1) there is nothing to gather: the range is the whole bucket.
        """
        works = []
        for b, shard in zip(self.buckets, shards):
            if self.zero == 0 or b.dp == 1:
                if shard.data_ptr() != b.param_data.data_ptr():
                    b.param_data.copy_(shard)
                continue
            # a separate input: the output buffer aliases my own range
            src = shard.to(self.param_dtype, copy=True)
            works.append(all_gather_single(b.param_data, src, group=b.group, async_op=True))
        self.topo.heartbeat.waiting("dp all-gather of updated parameters")
        for w in works:
            w.wait()

    # --- bookkeeping ----------------------------------------------------------------------------
    def memory(self) -> dict[str, int]:
        """Per-rank bytes of parameters and (persistent) gradients, and padding elements."""
        numel = sum(b.numel for b in self.buckets)
        used = sum(b.used for b in self.buckets)
        shard = sum(b.shard_end - b.shard_start for b in self.buckets)
        grad_elems = shard if self.zero == 2 else numel
        return {
            "numel": used,
            "padded_numel": numel,
            "padding": numel - used,
            "shard_numel": shard,
            "buckets": len(self.buckets),
            "param_bytes": numel * self.buckets[0].param_data.element_size(),
            "grad_bytes": grad_elems * 4,
            "grad_peak_bytes": numel * 4,  # zero 2 holds the full buffer during backward
        }

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
