"""One rank's part of one pipeline step: the state `run_pipeline` drives with a plan.

`StageRun` holds what a step keeps between the actions of a plan, keyed by (chunk,
microbatch): received activations and gradients waiting for their step, outputs and
input gradients waiting to be sent, the (input, output) pair each forward keeps for its
backward, and under a zero-bubble schedule the weight-gradient work each B left for its W.

Freed stage outputs (Megatron's ``deallocate_output_tensor``): once a forward's output has
been sent to the next stage, its storage is released; autograd keeps only the graph, and
the backward starts from the gradient received for it. The output tensor stays as a
one-element expanded view with the original shape, so ``torch.autograd.backward`` checks
the gradient's shape against it as usual. Rebinding the tensor's storage never changes
data an autograd node saved (a node that saved the output holds its own reference to the
old storage), so the release can only save memory, never change a gradient.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from trident.parallel.pipeline.p2p import PeerExchange, StageComm
from trident.parallel.pipeline.schedule import Exchange, Step
from trident.parallel.pipeline.timeline import Timeline, span
from trident.parallel.tensor.weight_grad import WeightGradStore, deferring, split_forward
from trident.parallel.topology import Topology

Microbatch = Mapping[str, torch.Tensor]
Key = tuple[int, int]  # (chunk, microbatch)


def forward_step(
    model: nn.Module, topo: Topology, data: Microbatch, x: torch.Tensor, loss_divisor: float,
    loss_scale: float = 1.0, last: bool | None = None, **model_kw: object,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One microbatch through this stage (or chunk): ``(out, loss_sum)``.

    On the last (virtual) stage `out` is the scalar to back-propagate, ``sum(loss * mask) *
    loss_scale / loss_divisor``, and `loss_sum` the detached fp32 ``sum(loss * mask)``;
    elsewhere `out` is the hidden state to send on and `loss_sum` is None. `last`
    defaults to the topology's last stage.
    """
    # x: tokens [b, s] (first stage) or the received hidden state [b, s(/tp), hidden]
    last = topo.is_last_stage if last is None else last
    device = topo.device
    labels = data["labels"].to(device, non_blocking=True) if last else None
    # doc_ids: [b, s] left where the loader put it (the CPU): the model reads its document
    # boundaries there, without a host-device sync, and copies it to the device itself
    doc_ids = data.get("doc_ids")
    y = model(x, labels=labels, doc_ids=doc_ids, **model_kw)
    if not last:
        return y, None  # hidden [b, s(/tp), hidden]
    if "loss_mask" in data:  # y: per-token loss [b, s]
        y = y * data["loss_mask"].to(device=device, dtype=y.dtype, non_blocking=True)
    y = y.sum()
    return y * (loss_scale / loss_divisor), y.detach().float()


def backward_step(out: torch.Tensor, grad_out: torch.Tensor | None, x: torch.Tensor | None) -> torch.Tensor | None:
    """Back-propagate one microbatch through this stage; the gradient of its input to send
    upstream (None on the first stage, whose input is token ids)."""
    torch.autograd.backward(out, grad_tensors=grad_out)
    return x.grad if x is not None else None


def release(out: torch.Tensor) -> None:
    """Drop `out`'s storage, keeping its shape and autograd graph (see the module doc)."""
    if out._base is not None:  # a view: its storage belongs to another tensor
        return
    out.data = torch.empty((1,) * out.dim(), dtype=out.dtype, device=out.device).expand(out.shape)


class StageRun:
    """The state of one step on one rank; `run_pipeline` calls one method per plan action."""

    def __init__(
        self, model: nn.Module, topo: Topology, microbatches: Sequence[Microbatch], comm: StageComm, vpp: int,
        loss_divisor: float, loss_scale: float, training: bool, split: bool,
        before_backward: Callable[[int, bool], None] | None, timeline: Timeline | None,
        model_kw: dict[str, object], last_backward: Key | None, limit: int, free_outputs: bool = True,
    ) -> None:
        self.model, self.topo, self.microbatches, self.comm, self.vpp = model, topo, microbatches, comm, vpp
        self.loss_divisor, self.loss_scale, self.training, self.split = loss_divisor, loss_scale, training, split
        self.before_backward, self.timeline, self.model_kw = before_backward, timeline, model_kw
        self.last_backward, self.limit, self.free_outputs = last_backward, limit, free_outputs
        self.inbox_act: dict[Key, torch.Tensor] = {}  # received activations waiting for their forward
        self.inbox_grad: dict[Key, torch.Tensor] = {}  # received gradients waiting for their backward
        self.outbox_act: dict[Key, torch.Tensor] = {}  # outputs waiting to be sent forward
        self.outbox_grad: dict[Key, torch.Tensor] = {}  # input gradients waiting to be sent backward
        self.saved: dict[Key, tuple[torch.Tensor | None, torch.Tensor]] = {}  # (input, output) for backward
        self.weight_work: dict[Key, WeightGradStore] = {}  # B done, W not yet (zero-bubble schedules)
        self.peak = 0
        self.held_peak = 0  # most bytes of stage inputs/outputs this rank held at once (`held_bytes`)
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=topo.device)

    def _first(self, chunk: int) -> bool:
        return self.topo.is_first_stage and chunk == 0

    def _last(self, chunk: int) -> bool:
        return self.topo.is_last_stage and chunk == self.vpp - 1

    def forward(self, step: Step) -> None:
        key, data = step.key, self.microbatches[step.mb]
        self.topo.heartbeat.phase("forward mb", step.mb)
        kw = dict(self.model_kw, chunk=step.chunk) if self.vpp > 1 else self.model_kw
        with span(self.timeline, str(step), "forward", step.mb), torch.set_grad_enabled(self.training):
            if self._first(step.chunk):
                x = data["tokens"].to(self.topo.device, non_blocking=True)  # [b, s]
            else:
                x = self.inbox_act.pop(key).requires_grad_(self.training)  # [b, s(/tp), hidden]
            with split_forward() if self.split else contextlib.nullcontext():
                out, loss = forward_step(self.model, self.topo, data, x, self.loss_divisor, self.loss_scale,
                                         last=self._last(step.chunk), **kw)
            if loss is not None:
                self.loss_sum += loss
            else:
                self.outbox_act[key] = out.detach()
            if self.training:
                self.saved[key] = (None if self._first(step.chunk) else x, out)
                self._check_held()

    def _check_held(self) -> None:
        held = len(self.saved) + len(self.weight_work)
        self.peak = max(self.peak, held)
        if held > self.limit:  # the schedule's memory promise, checked where memory is held
            raise RuntimeError(f"stage {self.topo.pp_rank} holds {held} microbatches' activations, over its bound {self.limit}")

    def backward(self, step: Step) -> None:
        key = step.key
        self.topo.heartbeat.phase("backward mb", step.mb)
        x, out = self.saved.pop(key)
        if self.before_backward is not None:
            self.before_backward(step.mb, key == self.last_backward)
        store = WeightGradStore() if self.split else None
        with span(self.timeline, str(step), "backward", step.mb):
            grad_out = None if self._last(step.chunk) else self.inbox_grad.pop(key)
            with deferring(store) if store is not None else contextlib.nullcontext():
                grad_in = backward_step(out, grad_out, x)
            if x is not None:
                self.outbox_grad[key] = grad_in
        if store is not None:
            self.weight_work[key] = store

    def weight(self, step: Step) -> None:
        """The W of a zero-bubble schedule: the weight gradients this (chunk, mb)'s B left."""
        self.topo.heartbeat.phase("weight gradients mb", step.mb)
        with span(self.timeline, str(step), "weight", step.mb):
            self.weight_work.pop(step.key).run()

    def exchange(self, action: Exchange) -> None:
        """Carry out one batch of the plan: at most one transfer of each (op, peer) kind."""
        self.topo.heartbeat.waiting("p2p", PeerExchange(action, self.comm.prev, self.comm.next))
        with span(self.timeline, str(action), "transfer"):
            kw: dict[str, object] = {}
            recv_key: dict[str, Key] = {}
            sent_outputs: list[Key] = []
            for t in action.transfers:
                key = f"{t.op}_{t.peer}"
                assert key not in kw, f"two '{key}' transfers in one batch: {action}"
                if t.op == "send":
                    kw[key] = (self.outbox_act if t.what == "act" else self.outbox_grad).pop((t.chunk, t.mb))
                    if t.what == "act":
                        sent_outputs.append((t.chunk, t.mb))
                else:
                    kw[key] = True
                    recv_key[t.what] = (t.chunk, t.mb)
            from_prev, from_next = self.comm.exchange(**kw, wait=action.wait)
            if from_prev is not None:
                self.inbox_act[recv_key["act"]] = from_prev
            if from_next is not None:
                self.inbox_grad[recv_key["grad"]] = from_next
            if action.wait and self.free_outputs:  # sent: the outputs' storage is no longer needed
                for k in sent_outputs:
                    if k in self.saved:
                        release(self.saved[k][1])

    def held_bytes(self) -> int:
        """Bytes this rank holds now outside autograd's saved tensors, each storage once: the
        stage inputs and outputs (inboxes, outboxes, what forwards keep for their backward;
        what freeing sent outputs saves) and what B's deferred weight gradients keep until
        their W (linear inputs and output gradients, zero-bubble schedules)."""
        seen: dict[int, int] = {}
        pairs = [t for pair in self.saved.values() for t in pair if t is not None]
        deferred = [t for store in self.weight_work.values() for t in store.holds]
        for t in [*pairs, *self.inbox_act.values(), *self.inbox_grad.values(), *self.outbox_act.values(),
                  *self.outbox_grad.values(), *deferred]:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())

    def note_held(self) -> None:
        self.held_peak = max(self.held_peak, self.held_bytes())

    def check_drained(self) -> None:
        self.comm.wait_all()
        left = (self.inbox_act or self.inbox_grad or self.outbox_act or self.outbox_grad or self.saved
                or self.weight_work)
        assert not left, "the plan left tensors behind"
