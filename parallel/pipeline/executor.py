"""The pipeline executor: runs one stage's schedule against its model, the transfers and the loss.

`run_pipeline` is one training step (or, with ``forward_only=True``, one evaluation pass)
of one rank of a pipeline. The schedule is data (`parallel.pipeline.schedule`): a list of
forward/backward steps turned into a plan with the transfers between them; this module
only carries that plan out, so a new schedule is a new list, not a new executor. With
pp = 1 the same code is plain gradient accumulation over microbatches.

Loss normalisation. The last stage computes the per-token loss of each microbatch and
back-propagates ``sum(loss * loss_mask) / loss_divisor``, where `loss_divisor` is the
number of loss-bearing tokens in the WHOLE global batch (every microbatch of every dp
rank; ``global_batch * seq_len`` without a loss mask). Gradients summed over
microbatches and then over dp are therefore exactly the gradients of the global-batch
mean, whatever the split into microbatches and replicas. The returned loss is that same
quantity, broadcast from the last stage over the pipeline and summed over dp, so every
rank logs the real value.

Hooks for the data-parallel reduction (the DP / ZeRO code plugs in here):

* ``before_backward(mb, is_last)`` is called right before each microbatch's backward;
  ``is_last`` is True exactly once per step, for the final backward of this stage. A
  gradient buffer that reduces buckets from autograd hooks, overlapped with the backward,
  arms itself when ``is_last`` is True and stays quiet otherwise (Megatron's ``no_sync``).
* ``grad_sync()`` is called exactly once per training step, after that final backward and
  after `finalize_grads` (below); it performs or completes the dp reduction (all-reduce,
  or reduce-scatter for ZeRO-2) and returns when ``.grad`` (or its buffer) is final.
  It is not called with ``forward_only=True``.

`finalize_grads` runs before ``grad_sync`` and sums, on full local gradients, the two
cross-rank partial gradients a pipeline stage has: parameters flagged
`trident.parallel.tensor.sharding.TP_PARTIAL` (sequence-parallel norms, QK-norm) over tp,
and the tied input/output embedding over the embedding group (first + last stage). An
overlapped dp reduction may therefore start on any parameter during the last backward
EXCEPT those flagged ``tp_partial_grad`` or ``pipeline_tied``: reduce those in
``grad_sync``, after finalisation (sums commute, but a reduce-scatter must see the whole
finalised gradient of a tensor). It sums each parameter's `reduction_grad`: the fp32
``main_grad`` a gradient buffer keeps, else ``.grad``.

Tied embeddings. The last stage (when it is not also the first) holds its own copy of
``embedding.weight`` under the same global name; the model flags both copies
``pipeline_tied`` and the last stage's ``pipeline_duplicate`` (`trident.parallel.tensor.sharding`). After `finalize_grads` the
two copies' gradients are equal (their sum), so identical optimizer steps keep the
weights equal. The gradient norm, parameter counts and checkpoints must count the tensor
once: they skip parameters for which `is_pipeline_duplicate(param)` is True.

The executor never imports the model: a stage is any module called as
``stage(x, labels=..., doc_ids=...)`` that returns the hidden state, or on the last stage
the per-token loss ``[b, s]``, and that may carry ``first_stage``/``last_stage``
attributes (checked against the topology). `trident.model.stage.build_stage` builds one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from trident.errors import UserError
from trident.parallel.collectives import all_reduce, all_reduce_coalesced
from trident.parallel.pipeline.p2p import StageComm
from trident.parallel.pipeline.schedule import (
    SCHEDULES,
    Exchange,
)
from trident.parallel.pipeline.schedule import forward_only as forward_only_steps
from trident.parallel.pipeline.schedule import peak_in_flight, plan, schedule_steps
from trident.parallel.pipeline.timeline import Timeline, span
from trident.parallel.tensor.layers import sync_tp_partial_grads
from trident.parallel.tensor.sharding import is_pipeline_tied, reduction_grad
from trident.parallel.topology import Topology

Microbatch = Mapping[str, torch.Tensor]


def finalize_grads(model: nn.Module, topo: Topology) -> None:
    """Sum the partial gradients a stage holds after its last backward: tp-partial
    parameters over tp, then both copies of a tied embedding over the embedding group."""
    sync_tp_partial_grads(model, topo)
    if topo.pp == 1:
        return
    tied = [p for p in model.parameters() if is_pipeline_tied(p)]
    for p in tied:
        if reduction_grad(p) is None:
            p.grad = torch.zeros_like(p)
    all_reduce_coalesced([reduction_grad(p) for p in tied], topo.embedding_group)


# --- the executor ---------------------------------------------------------------------------
@dataclass
class PipelineResult:
    loss_tensor: torch.Tensor  # [1] the global-batch loss, the same on every rank, on the device
    microbatches: int
    peak_in_flight: int  # most microbatches whose activations this stage held at once
    in_flight_limit: int  # the schedule's bound on that number (asserted)
    sends: int  # point-to-point operations this rank issued
    recvs: int

    @property
    def loss(self) -> float:
        """The loss as a number. Reading it waits for the device (a host-device sync), so the
        step does not read it: the trainer does, after the optimizer step's own sync."""
        return float(self.loss_tensor.item())


def forward_step(
    model: nn.Module, topo: Topology, data: Microbatch, x: torch.Tensor, loss_divisor: float,
    loss_scale: float = 1.0, **model_kw: object,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One microbatch through this stage: ``(out, loss_sum)``.

    On the last stage `out` is the scalar to back-propagate, ``sum(loss * mask) *
    loss_scale / loss_divisor``, and `loss_sum` the detached fp32 ``sum(loss * mask)``;
    elsewhere `out` is the hidden state to send on and `loss_sum` is None.
    """
    # x: tokens [b, s] (first stage) or the received hidden state [b, s(/tp), hidden]
    device = topo.device
    labels = data["labels"].to(device, non_blocking=True) if topo.is_last_stage else None
    # doc_ids: [b, s] left where the loader put it (the CPU): the model reads its document
    # boundaries there, without a host-device sync, and copies it to the device itself
    doc_ids = data.get("doc_ids")
    y = model(x, labels=labels, doc_ids=doc_ids, **model_kw)
    if not topo.is_last_stage:
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


def run_pipeline(
    model: nn.Module,
    topo: Topology,
    microbatches: Sequence[Microbatch],
    *,
    act_shape: tuple[int, ...],
    loss_divisor: float,
    schedule: str = "1f1b",
    forward_only: bool = False,
    grad_sync: Callable[[], None] | None = None,
    before_backward: Callable[[int, bool], None] | None = None,
    timeline: Timeline | None = None,
    label_smoothing: float = 0.0,
    reduce_loss_over_dp: bool = True,
    loss_scale: float = 1.0,
) -> PipelineResult:
    """Run one step of `schedule` on this rank's stage and return the global-batch loss.

    At pp = 1 this is plain gradient accumulation: for each microbatch, `forward_step`
    then `backward_step`, then `finalize_grads` and `grad_sync` once. With pp > 1 the
    schedule's plan interleaves those steps with the transfers between stages.

    microbatches: this dp rank's microbatches, in order, the same list on every stage of
        the pipeline. Each is a dict of [b, s] tensors: ``tokens`` (needed on the first
        stage), ``labels`` (last stage), ``doc_ids`` (every stage, when documents are
        packed: the attention mask is rebuilt per layer) and an optional float
        ``loss_mask`` (last stage).
    act_shape: the tensor passed between stages, from the config
        (`trident.parallel.pipeline.p2p.activation_shape`); no shapes are exchanged at run time.
    loss_divisor: loss-bearing tokens in the whole global batch (all microbatches, all dp
        ranks), so the loss does not depend on the layout.
    forward_only: evaluation; no activations kept, no gradients, no hooks called.
    loss_scale: fp16 dynamic loss scale; only the back-propagated loss is multiplied by it
        (the returned loss is the true one), the optimizer unscales the gradients.
    """
    p, r, m = topo.pp, topo.pp_rank, len(microbatches)
    _check_args(model, topo, microbatches, act_shape, loss_divisor, schedule)
    training = not forward_only
    steps = schedule_steps(schedule, p, r, m) if training else forward_only_steps(p, r, m)
    run = _StageRun(
        model, topo, microbatches, act_shape, loss_divisor, loss_scale, training, before_backward, timeline,
        {"label_smoothing": label_smoothing} if label_smoothing else {},
        last_backward=next((st.mb for st in reversed(steps) if st.kind == "B"), -1),
        limit=peak_in_flight(steps),
    )
    for action in plan(steps, r, p):
        if isinstance(action, Exchange):
            run.exchange(action)
        elif action.kind == "F":
            run.forward(action.mb)
        else:
            run.backward(action.mb)
    run.check_drained()
    if training:
        finalize_grads(model, topo)
        if grad_sync is not None:
            grad_sync()
    return PipelineResult(
        loss_tensor=_global_loss(run.loss_sum / loss_divisor, topo, reduce_loss_over_dp),
        microbatches=m,
        peak_in_flight=run.peak,
        in_flight_limit=run.limit if training else 0,
        sends=run.comm.sends,
        recvs=run.comm.recvs,
    )


class _StageRun:
    """The state of one step on one stage: tensors waiting to be sent, received or
    back-propagated, keyed by microbatch. `run_pipeline` drives it with the plan."""

    def __init__(
        self, model: nn.Module, topo: Topology, microbatches: Sequence[Microbatch], act_shape: tuple[int, ...],
        loss_divisor: float, loss_scale: float, training: bool, before_backward: Callable[[int, bool], None] | None,
        timeline: Timeline | None, model_kw: dict[str, object], last_backward: int, limit: int,
    ) -> None:
        self.model, self.topo, self.microbatches = model, topo, microbatches
        self.loss_divisor, self.loss_scale, self.training = loss_divisor, loss_scale, training
        self.before_backward, self.timeline, self.model_kw = before_backward, timeline, model_kw
        self.last_backward, self.limit = last_backward, limit
        act_dtype = next((q.dtype for q in model.parameters() if q.is_floating_point()), torch.float32)
        self.comm = StageComm(topo, act_shape, act_dtype, topo.device)
        self.inbox_act: dict[int, torch.Tensor] = {}  # received activations waiting for their forward
        self.inbox_grad: dict[int, torch.Tensor] = {}  # received gradients waiting for their backward
        self.outbox_act: dict[int, torch.Tensor] = {}  # outputs waiting to be sent forward
        self.outbox_grad: dict[int, torch.Tensor] = {}  # input gradients waiting to be sent backward
        self.saved: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}  # (input, output) for backward
        self.peak = 0
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=topo.device)

    def forward(self, mb: int) -> None:
        topo, data = self.topo, self.microbatches[mb]
        with span(self.timeline, f"F{mb}", "forward", mb), torch.set_grad_enabled(self.training):
            if topo.is_first_stage:
                x = data["tokens"].to(topo.device, non_blocking=True)  # [b, s]
            else:
                x = self.inbox_act.pop(mb).requires_grad_(self.training)  # [b, s(/tp), hidden]
            out, loss = forward_step(self.model, topo, data, x, self.loss_divisor, self.loss_scale, **self.model_kw)
            if loss is not None:
                self.loss_sum += loss
            else:
                self.outbox_act[mb] = out.detach()
            if self.training:
                self.saved[mb] = (None if topo.is_first_stage else x, out)
                self.peak = max(self.peak, len(self.saved))
                if len(self.saved) > self.limit:  # the schedule's memory promise, checked where memory is held
                    raise RuntimeError(
                        f"stage {topo.pp_rank} holds {len(self.saved)} microbatches' activations, over its bound {self.limit}"
                    )

    def backward(self, mb: int) -> None:
        x, out = self.saved.pop(mb)
        if self.before_backward is not None:
            self.before_backward(mb, mb == self.last_backward)
        with span(self.timeline, f"B{mb}", "backward", mb):
            grad_out = None if self.topo.is_last_stage else self.inbox_grad.pop(mb)
            grad_in = backward_step(out, grad_out, x)
            if x is not None:
                self.outbox_grad[mb] = grad_in

    def exchange(self, action: Exchange) -> None:
        """Carry out one batch of the plan: at most one transfer of each (op, peer) kind."""
        with span(self.timeline, str(action), "transfer"):
            kw: dict[str, object] = {}
            recv_mb: dict[str, int] = {}
            for t in action.transfers:
                key = f"{t.op}_{t.peer}"
                assert key not in kw, f"two '{key}' transfers in one batch: {action}"
                if t.op == "send":
                    kw[key] = (self.outbox_act if t.what == "act" else self.outbox_grad).pop(t.mb)
                else:
                    kw[key] = True
                    recv_mb[t.what] = t.mb
            from_prev, from_next = self.comm.exchange(**kw)
            if from_prev is not None:
                self.inbox_act[recv_mb["act"]] = from_prev
            if from_next is not None:
                self.inbox_grad[recv_mb["grad"]] = from_next

    def check_drained(self) -> None:
        left = self.inbox_act or self.inbox_grad or self.outbox_act or self.outbox_grad or self.saved
        assert not left, "the plan left tensors behind"


def _global_loss(local: torch.Tensor, topo: Topology, over_dp: bool) -> torch.Tensor:
    """The last stage's value on every rank of the pipeline, summed over dp replicas."""
    value = local.reshape(1).clone()
    if topo.pp > 1:
        dist.broadcast(value, src=topo.pp_last_rank, group=topo.pp_group)
    if over_dp and topo.dp > 1:
        all_reduce(value, topo.dp_group)
    return value


def _check_args(
    model: nn.Module,
    topo: Topology,
    microbatches: Sequence[Microbatch],
    act_shape: tuple[int, ...],
    loss_divisor: float,
    schedule: str,
) -> None:
    """Local checks that every rank makes identically, before its first transfer."""
    m = len(microbatches)
    if m < 1:
        raise UserError("a pipeline step needs at least one microbatch, got 0")
    if schedule not in SCHEDULES:
        raise UserError(f"unknown pipeline schedule {schedule!r}; valid schedules are {', '.join(SCHEDULES)}")
    if not (isinstance(loss_divisor, (int, float)) and math.isfinite(loss_divisor) and loss_divisor > 0):
        raise UserError(f"loss_divisor must be a positive number of tokens, got {loss_divisor!r}")
    built = (getattr(model, "first_stage", None), getattr(model, "last_stage", None))
    if built != (None, None) and built != (topo.is_first_stage, topo.is_last_stage):
        raise UserError(
            f"the model was built as first_stage={built[0]}, last_stage={built[1]} but this rank "
            f"is stage {topo.pp_rank} of {topo.pp}; build it with trident.model.stage.build_stage(cfg, topo)"
        )
    need = (["tokens"] if topo.is_first_stage else []) + (["labels"] if topo.is_last_stage else [])
    for i, data in enumerate(microbatches):
        missing = [k for k in need if k not in data]
        if missing:
            raise UserError(f"microbatch {i} lacks {missing} needed on pipeline stage {topo.pp_rank} of {topo.pp}")
        for key, t in data.items():
            if t.shape[0] != act_shape[0]:
                raise UserError(
                    f"microbatch {i} has {key} of batch size {t.shape[0]} but the micro batch size is {act_shape[0]}"
                )
