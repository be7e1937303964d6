"""ZeRO-3 (fully sharded data parallelism): parameters sharded too, gathered per unit.

ZeRO 1/2 shard the optimizer state and the gradients over the ranks that hold the same
weights (dp x cp), but every rank still keeps all of its tp/pp-local parameters. Here each
rank keeps only its 1/dp of them (`Unit.shard`, in the model dtype), and a unit's full
parameters exist only while the unit computes (DeepSpeed ZeRO-3, PyTorch FSDP):

* forward: `run` all-gathers the unit's parameters (or waits for the prefetch that
  already did), issues the NEXT unit's all-gather so it travels while this unit computes,
  runs the unit, and frees the parameters again (``reshard_after_forward``);
* backward: a hook on the unit's output fires when the unit's backward is about to begin;
  it gathers the parameters again (recomputation reuses them) and prefetches the unit
  that runs backward next. When every parameter of the unit has its gradient (a
  post-accumulate hook per parameter adds it to a flat fp32 buffer, as `GradBuffer`
  does), the unit's reduce-scatter is launched at once, and the parameters are freed; the
  scattered shard is added to the persistent fp32 gradient shard (``main_grad``) a step
  later or at the end, so the reduction overlaps the next unit's backward, and
  microbatches accumulate there in fp32.

Units are the model's (`trident.parallel.zero.units`): one per block, the embedding, the
position embedding, the final norm, the head. Which unit runs next (`unit_order`) is
learned as they run and told by the pipeline executor across its actions, so every dp
rank issues the same collectives in the same order. Under a zero-bubble schedule a unit is
freed when its B ends (its W needs no parameters), and the few gradients its B makes wait
in fp32 (``parked``) rather than in a unit-sized buffer until its W.

With ``reshard_after_forward=False`` a unit stays gathered from its first use in a step
until the step's gradients are final: one all-gather per unit per step instead of two per
microbatch, at the memory of unsharded parameters during the step (the choice for a
pipeline stage that runs many microbatches).

Deferred gradients (tp-partial norms and QK-norm, a tied embedding split over pipeline
stages) are partial sums that `finalize_grads` completes on full gradients at ZeRO 0-2.
Here no full gradient survives its unit's backward; as the sums are linear, the scattered
shards are summed instead at the end of the step (over tp, over the embedding group), which
gives the same result because every rank of those groups has the same unit layout.

Expert parallelism: a block's experts are a unit of their own (`experts_of`), sharded over
the dp/ep ranks that hold the same experts instead of dp, gathered and freed with their
block; each reduces its gradients over its own group.

The optimizer, the norm and the state files see the units as buckets (`unit_shard`).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

import torch
from torch import nn

from trident.errors import UserError
from trident.parallel.collectives import all_gather_single, all_reduce_coalesced, reduce_scatter_single
from trident.parallel.tensor.sharding import is_expert
from trident.parallel.tensor.weight_grad import in_split_b, in_w
from trident.parallel.topology import Topology
from trident.parallel.zero import unit_stats
from trident.parallel.zero.grad_buffer import Slot, check_same_layout
from trident.parallel.zero.unit_order import Action, UnitOrder
from trident.parallel.zero.unit_shard import Unit, make_unit

IN_FLIGHT = 2  # reduce-scatters outstanding before the oldest is waited for


class ShardedParams:
    """The `GradBuffer` of ZeRO-3: units of sharded parameters, gathered just in time."""

    zero = 3

    def __init__(self, model: nn.Module, topo: Topology, reshard_after_forward: bool = True, prefetch: bool = True):
        self.topo, self.reshard_after_forward, self.prefetch = topo, reshard_after_forward, prefetch
        # without overlap (`prefetch` off) each reduce-scatter is waited for at once, too
        self.in_flight = IN_FLIGHT if prefetch else 0
        self.dp, self.dp_rank, self.group = topo.dp_cp, topo.dp_cp_rank, topo.dp_cp_group
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not named:
            raise UserError("the model has no trainable parameters to optimise")
        dtypes = {p.dtype for p in named.values()}
        if len(dtypes) != 1:
            raise UserError(f"all trainable parameters must share one dtype, found {sorted(map(str, dtypes))}")
        self.param_dtype = dtypes.pop()
        self.device = next(iter(named.values())).device
        self.events: list[tuple[float, str, str]] = []  # (time, what, unit): the collectives' timeline
        self.buckets: list[Unit] = []
        self.units: dict[str, Unit] = {}
        self.experts_of: dict[str, Unit] = {}  # a block's experts under expert parallelism: a unit of their own
        self.slots: dict[int, Slot] = {}
        for name, names in model.parameter_units().items():
            params = [(n, named[n]) for n in names if n in named]
            dense, experts = [q for q in params if not is_expert(q[1])], [q for q in params if is_expert(q[1])]
            if dense:
                self._make_unit(name, dense, self.dp, self.dp_rank, self.group)
            if experts:  # held by the dp/ep ranks of this rank's expert-data-parallel group: sharded over them
                self.experts_of[name] = self._make_unit(f"{name}.experts", experts, topo.edp, topo.edp_rank,
                                                        topo.edp_group)
        missing = sorted(set(named) - {s.name for s in self.slots.values()})
        if missing:
            raise UserError(f"parameters {missing} belong to no unit of the model; ZeRO-3 cannot shard them")
        check_same_layout([u for u in self.buckets if not u.expert], self.group, self.dp)
        check_same_layout([u for u in self.buckets if u.expert], topo.edp_group, topo.edp)
        self.unit_order = UnitOrder()  # which unit runs next: what to prefetch
        self._open: list[Unit] = []  # gathered for a split backward's B, their W still to come
        self.pending: list[tuple[Unit, Any, torch.Tensor, torch.Tensor]] = []  # (unit, work, out, input)
        self._synced = False
        self._hooks = [s.param.register_post_accumulate_grad_hook(self._grad_hook(s)) for s in self.slots.values()]
        model.unit_hooks = self

    # --- construction -----------------------------------------------------------------------
    def _make_unit(self, name: str, params: list[tuple[str, nn.Parameter]], dp: int, dp_rank: int, group) -> Unit:
        """Lay the unit out (`make_unit`) and leave its parameters as storage-less
        placeholders until they are gathered."""
        unit = make_unit(len(self.buckets), name, params, dp, dp_rank, group, self.param_dtype, self.device,
                         self.topo.tp)
        self.slots.update((id(slot.param), slot) for slot in unit.slots)
        self.buckets.append(unit)
        self.units[name] = unit
        self._free(unit)
        return unit

    # --- gathering and freeing --------------------------------------------------------------
    def _start_gather(self, unit: Unit) -> None:
        """Issue the unit's all-gather (asynchronously) unless it is gathered or on its way.

        It lands in the unit's one persistent buffer, whose storage `_free` shrank to nothing:
        autograd's saved views of the weights (a linear's ``weight.t()``) share that storage, so
        they hold no memory between a unit's forward and its backward and read the values
        gathered back in place (FSDP's storage resize). The write must not bump the buffer's
        version counter, or those saved views would count as modified in place."""
        if unit.gathered or unit.gather_work is not None:
            return
        storage = unit.param_data.untyped_storage()
        if storage.nbytes() == 0:
            storage.resize_(unit.numel * unit.param_data.element_size())
        with torch.autograd._unsafe_preserve_version_counter(unit.param_data):
            if unit.dp == 1:
                unit.param_data.copy_(unit.shard)
                return
            unit.gather_work = all_gather_single(unit.param_data, unit.shard, group=unit.group, async_op=True)
        self._note("all_gather", unit, unit.gather_work)

    def _gather(self, unit: Unit) -> None:
        """Make the unit's parameters usable: wait for its all-gather, point them at it."""
        if unit.gathered:
            return
        self._start_gather(unit)
        if unit.gather_work is not None:
            self._wait("all_gather", unit, unit.gather_work)
            unit.gather_work = None
        for slot in unit.slots:
            slot.param.data = unit.param_data[slot.start : slot.start + slot.numel].view_as(slot.param)
        unit.gathered = True

    def _free(self, unit: Unit) -> None:
        """Drop the gathered parameters: the buffer's storage shrinks to 0 bytes (saved views
        of it included), and each parameter keeps its shape over one NaN element, so a use
        outside its unit shows as NaN instead of silently reading stale values."""
        if unit.gather_work is not None:  # a prefetch nobody used: finish it before dropping its buffer
            self._wait("all_gather", unit, unit.gather_work)
            unit.gather_work = None
        nan = torch.full((1,), float("nan"), dtype=self.param_dtype, device=self.device)
        for slot in unit.slots:
            slot.param.data = nan.expand(slot.param.shape)
        unit.param_data.untyped_storage().resize_(0)
        unit.gathered = unit.keep = False
        self.events.append((time.perf_counter(), "free", unit.name))

    @property
    def order(self) -> list[str]:
        """Units in the order the first forward ran them."""
        return self.unit_order.order

    def _prefetch(self, phase: str, name: str) -> bool:
        """Note that unit `name` runs now and issue the gather of the unit expected next
        (`UnitOrder`); True when that is this same unit, first in the next action: it stays
        gathered across the switch."""
        ahead, crossing = self.unit_order.advance(phase, name)
        if crossing and ahead == name:
            return True
        if self.prefetch and ahead is not None and ahead != name:
            for u in self._with_experts(self.units[ahead]):
                self._start_gather(u)
        return False

    # --- the unit protocol (`trident.parallel.zero.units`) ------------------------------------
    def begin_action(self, action: Action, following: Action | None) -> None:
        """The pipeline executor starts `action` (kind, chunk); `following` is its next action
        that runs units. Units whose split backward's B has ended are freed here: their W
        computes weight gradients from stored tensors and needs no parameters."""
        self._free_open()
        self.unit_order.begin(action, following)

    def _free_open(self) -> None:
        open_units, self._open = self._open, []
        for u in open_units:
            if self.reshard_after_forward and u.gathered and not u.keep:
                self._free(u)

    def run(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` with unit `name` gathered, the next unit's gather in flight."""
        unit = self.units.get(name)
        if unit is None:  # a unit with no trainable parameters on this rank
            return fn(*args)
        units = self._with_experts(unit)
        for u in units:
            self._gather(u)
            u.keep = False
        keep = self._prefetch("forward", name)
        self.events.append((time.perf_counter(), "forward", name))
        out = fn(*args)
        self.events.append((time.perf_counter(), "forward_end", name))
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda grad, name=name: self._before_backward(name))
        for u in units:
            if keep:
                u.keep = True
            elif self.reshard_after_forward:
                self._free(u)
        return out

    def _with_experts(self, unit: Unit | None) -> list[Unit]:
        """A unit and, under expert parallelism, its experts' unit: gathered and freed together."""
        if unit is None:
            return []
        return [unit, self.experts_of[unit.name]] if unit.name in self.experts_of else [unit]

    def _before_backward(self, name: str) -> None:
        """The unit's backward is next: gather it again and prefetch the one after. In a split
        backward's B the unit before it is done until its W, which needs no parameters: free it."""
        split = in_split_b()
        if split:
            self._free_open()
        units = self._with_experts(self.units[name])
        for u in units:
            self._gather(u)
            u.keep = False
        keep = self._prefetch("backward", name)
        self.events.append((time.perf_counter(), "backward", name))
        for u in units:
            u.keep = keep
        if split:
            self._open = units

    # --- gradients ------------------------------------------------------------------------------
    def _grad_hook(self, slot: Slot) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            if param.grad is None:
                return
            if self._synced:
                raise RuntimeError(f"a gradient for {slot.name} arrived after the step's gradients were final; "
                                   f"call zero_grad() before the next step")
            unit = self.buckets[slot.bucket]
            unit.splits |= in_w()
            if unit.splits and unit.grad_data is None and in_split_b():
                # a B whose W brings the unit's weight gradients later: keep these few (norms,
                # biases) aside in fp32 rather than hold a unit-sized buffer until the W
                unit.park(slot.start, param.grad)
            else:
                unit.gradient()[slot.start : slot.start + slot.numel].add_(param.grad.reshape(-1))
            param.grad = None
            unit.ready.add(slot.start)
            if len(unit.ready) == len(unit.slots):  # the unit's backward is over
                self.events.append((time.perf_counter(), "backward_end", unit.name))
                self._reduce(unit)
                # (in a W the unit was freed when its B ended: gathered now means prefetched)
                if self.reshard_after_forward and not unit.keep and not in_w():
                    self._free(unit)

        return hook

    def _reduce(self, unit: Unit) -> None:
        """Launch the unit's reduce-scatter of this microbatch's gradient; fold in the oldest
        ones still in flight beyond `IN_FLIGHT` (their buffers go back to the allocator)."""
        data, unit.grad_data = unit.grad_data, None
        unit.ready.clear()
        if data is None:
            return
        if unit.dp == 1:
            unit.main_grad.add_(data)
            return
        out = torch.empty(unit.shard_end - unit.shard_start, dtype=torch.float32, device=self.device)
        work = reduce_scatter_single(out, data, group=unit.group, async_op=True)
        self._note("reduce_scatter", unit, work)
        self.pending.append((unit, work, out, data))
        while len(self.pending) > self.in_flight:
            self._fold(self.pending.pop(0))

    def _fold(self, item: tuple[Unit, Any, torch.Tensor, torch.Tensor]) -> None:
        unit, work, out, _ = item
        self._wait("reduce_scatter", unit, work)
        unit.main_grad.add_(out)

    # --- the step protocol (the same calls as `GradBuffer`) -------------------------------------
    def before_backward(self, mb: int, is_last: bool) -> None:
        """Every microbatch's gradients are reduce-scattered as its backward ends: nothing to arm."""

    def start_grad_sync(self) -> None:
        """Reduce what a backward left unfinished (a unit with a parameter that got no gradient)."""
        for unit in self.buckets:
            if unit.parked:
                unit.gradient()
            if unit.grad_data is not None:
                self._reduce(unit)

    def finish_grad_sync(self) -> None:
        """Complete the step's reductions: ``main_grad`` of each unit holds its final shard.

        The deferred sums run here, on shards: tp-partial ranges over tp, a tied embedding
        over the embedding group (first and last stage hold the same unit layout)."""
        if self._synced:
            return
        self.start_grad_sync()
        while self.pending:
            self._fold(self.pending.pop(0))
        all_reduce_coalesced([u.main_grad[a:b] for u in self.buckets for a, b in u.tp_partial], self.topo.tp_group)
        tied = [u.main_grad for u in self.buckets if u.tied]
        if tied and self.topo.pp > 1:
            all_reduce_coalesced(tied, self.topo.embedding_group)
        for unit in self.buckets:  # kept gathered (reshard_after_forward=False), or prefetched for
            if unit.gathered or unit.gather_work is not None:  # a use that did not come: stale after the step
                self._free(unit)
        self._synced = True

    def zero_grad(self) -> None:
        """Start a new step: clear the gradient shards and the reduction state."""
        for _, work, _, _ in self.pending:  # a step abandoned mid-way: let its collectives finish
            work.wait()
        self.pending.clear()
        for unit in self.buckets:
            unit.main_grad.zero_()
            unit.grad_data = None
            unit.parked.clear()
            unit.ready.clear()
            for slot in unit.slots:
                slot.param.grad = None
        self.events.clear()
        self._open = []
        self._synced = False

    def owned_params(self, unit: Unit) -> torch.Tensor:
        """This rank's parameters of `unit` (the optimizer's fp32 master when the model is fp32)."""
        return unit.shard

    def gather_params(self, shards: list[torch.Tensor]) -> None:
        """After a step: the updated fp32 masters become the shards (rounded to the model
        dtype); they are gathered when their unit next runs."""
        for unit, master in zip(self.buckets, shards):
            if master.data_ptr() != unit.shard.data_ptr():
                unit.shard.copy_(master)
            if unit.gathered or unit.gather_work is not None:
                self._free(unit)

    @contextlib.contextmanager
    def full_parameters(self, write_back: bool = False) -> Iterator[None]:
        """Every unit gathered for the body (a checkpoint's save or load); with `write_back`,
        what the body wrote into the parameters becomes the shards. Holds the rank's whole
        tp/pp-local model, as ZeRO 0-2 always do, for the duration."""
        for unit in self.buckets:
            self._gather(unit)
        try:
            yield
        finally:
            for unit in self.buckets:
                if write_back:
                    unit.shard.copy_(unit.param_data[unit.shard_start : unit.shard_end])
                self._free(unit)

    # --- bookkeeping ----------------------------------------------------------------------------
    def holds(self, t: torch.Tensor) -> bool:
        """Is `t` (a tensor autograd saves) a view of gathered parameters? The activation
        meter asks: a gathered weight saved for backward is not an activation."""
        storage = t.untyped_storage()
        return any(u.gathered and u.param_data.untyped_storage().data_ptr() == storage.data_ptr() for u in self.buckets)

    def _note(self, kind: str, unit: Unit, work: Any) -> None:
        """Record an issued collective (gloo's works have no future to say when one completes:
        `_wait` records how long the step waited for it, the part not hidden)."""
        self.events.append((time.perf_counter(), f"{kind}_issue", unit.name))

    def _wait(self, kind: str, unit: Unit, work: Any) -> None:
        start = time.perf_counter()
        self.topo.heartbeat.waiting(f"dp {kind.replace('_', '-')} unit", unit.name)
        work.wait()
        self.events.append((start, f"{kind}_wait", unit.name))
        self.events.append((time.perf_counter(), f"{kind}_waited", unit.name))

    def exposed_wait_s(self) -> float:
        """Seconds this step waited for its collectives (the communication not hidden)."""
        return unit_stats.exposed_wait_s(self.events)

    def memory(self) -> dict[str, int]:
        """Per-rank bytes of the shards and a step's peak (`unit_stats.memory`)."""
        return unit_stats.memory(self)

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
