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
cross-rank partial gradients a pipeline stage has: parameters flagged by
`trident.parallel.tensor.layers.mark_tp_partial_grad` (sequence-parallel norms, QK-norm) over tp,
and the tied input/output embedding over the embedding group (first + last stage). An
overlapped dp reduction may therefore start on any parameter during the last backward
EXCEPT those flagged ``tp_partial_grad`` or ``pipeline_tied``: reduce those in
``grad_sync``, after finalisation (sums commute, but a reduce-scatter must see the whole
finalised gradient of a tensor).

Tied embeddings. The last stage (when it is not also the first) holds its own copy of
``embedding.weight`` under the same global name; `mark_tied_embedding` flags both copies
``pipeline_tied`` and the last stage's ``pipeline_duplicate``. After `finalize_grads` the
two copies' gradients are equal (their sum), so identical optimizer steps keep the
weights equal. The gradient norm, parameter counts and checkpoints must count the tensor
once: skip parameters for which `is_pipeline_duplicate(param)` is True.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from trident.errors import UserError
from trident.model.config import ModelConfig
from trident.model.gpt import GPT
from trident.parallel.tensor.layers import sync_tp_partial_grads
from trident.parallel.tensor.mappings import all_reduce
from trident.parallel.pipeline.p2p import StageComm
from trident.parallel.random import RNGStreams
from trident.parallel.pipeline.stages import stage_layers
from trident.parallel.topology import Topology
from trident.parallel.pipeline.schedule import (
    SCHEDULES,
    Exchange,
    forward_only as forward_only_steps,
    in_flight_limit,
    plan,
    schedule_steps,
)
from trident.parallel.pipeline.timeline import Timeline, span

TIED_ATTR = "pipeline_tied"
DUPLICATE_ATTR = "pipeline_duplicate"

Microbatch = Mapping[str, torch.Tensor]


# --- stages ---------------------------------------------------------------------------------
def build_stage(
    cfg: ModelConfig,
    topo: Topology,
    split: Sequence[int] | None = None,
    sequence_parallel: bool = False,
    rng: RNGStreams | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    recompute: str = "none",
) -> GPT:
    """This rank's stage of the model (uninitialised: call ``init_weights(seed)``).

    `split` is an explicit number of layers per stage; by default layers are balanced.
    `recompute` is the activation recomputation mode (`trident.model.gpt.RECOMPUTE`).
    Bad splits raise the same `UserError` on every rank, before any transfer.
    """
    ranges = stage_layers(cfg.n_layers, topo.pp, split)
    model = GPT(
        cfg,
        topo,
        layers=ranges[topo.pp_rank],
        first_stage=topo.is_first_stage,
        last_stage=topo.is_last_stage,
        sequence_parallel=sequence_parallel,
        rng=rng,
        device=device,
        dtype=dtype,
        recompute=recompute,
    )
    mark_tied_embedding(model, topo)
    return model


def mark_tied_embedding(model: nn.Module, topo: Topology) -> None:
    """Flag the two copies of a tied embedding split across the pipeline (idempotent)."""
    if not isinstance(model, GPT) or topo.pp == 1 or not model.cfg.tie_embeddings or not hasattr(model, "embedding"):
        return
    weight = model.embedding.weight
    setattr(weight, TIED_ATTR, True)
    if model.last_stage and not model.first_stage:
        setattr(weight, DUPLICATE_ATTR, True)


def is_pipeline_duplicate(param: nn.Parameter) -> bool:
    """True for the last stage's copy of a tied embedding: count it nowhere (norm, checkpoint)."""
    return getattr(param, DUPLICATE_ATTR, False)


def finalize_grads(model: nn.Module, topo: Topology) -> None:
    """Sum the partial gradients a stage holds after its last backward: tp-partial
    parameters over tp, then both copies of a tied embedding over the embedding group."""
    sync_tp_partial_grads(model, topo)
    tied = [p for p in model.parameters() if getattr(p, TIED_ATTR, False)]
    if not tied or topo.pp == 1:
        return
    for p in tied:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in tied])
    all_reduce(flat, topo.embedding_group)
    offset = 0
    for p in tied:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()


# --- the executor ---------------------------------------------------------------------------
@dataclass
class PipelineResult:
    loss: float  # the global-batch loss, the same on every rank
    microbatches: int
    peak_in_flight: int  # most microbatches whose activations this stage held at once
    in_flight_limit: int  # the schedule's bound on that number (asserted)
    sends: int  # point-to-point operations this rank issued
    recvs: int


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
    act_dtype: torch.dtype | None = None,
    loss_scale: float = 1.0,
) -> PipelineResult:
    """Run one step of `schedule` on this rank's stage and return the global-batch loss.

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
    limit = in_flight_limit(schedule, p, r, m) if training else 0
    backwards = [s.mb for s in steps if s.kind == "B"]
    last_backward_mb = backwards[-1] if backwards else -1
    if act_dtype is None:
        act_dtype = next((q.dtype for q in model.parameters() if q.is_floating_point()), torch.float32)
    device = topo.device
    comm = StageComm(topo, act_shape, act_dtype, device)
    if training:
        mark_tied_embedding(model, topo)
    extra = {"label_smoothing": label_smoothing} if label_smoothing else {}

    inbox_act: dict[int, torch.Tensor] = {}  # received activations waiting for their forward
    inbox_grad: dict[int, torch.Tensor] = {}  # received gradients waiting for their backward
    outbox_act: dict[int, torch.Tensor] = {}  # outputs waiting to be sent forward
    outbox_grad: dict[int, torch.Tensor] = {}  # input gradients waiting to be sent backward
    saved: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}  # (input, output) for backward
    peak = 0
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)

    for action in plan(steps, r, p):
        if isinstance(action, Exchange):
            with span(timeline, str(action), "transfer"):
                _exchange(comm, action, inbox_act, inbox_grad, outbox_act, outbox_grad)
            continue
        mb, data = action.mb, microbatches[action.mb]
        if action.kind == "F":
            with span(timeline, str(action), "forward", mb), torch.set_grad_enabled(training):
                # x: tokens [b, s] (first stage) or hidden [b, s(/tp), hidden]
                x = data["tokens"].to(device, non_blocking=True) if topo.is_first_stage else inbox_act.pop(mb).requires_grad_(training)
                labels = data["labels"].to(device, non_blocking=True) if topo.is_last_stage else None
                doc_ids = data["doc_ids"].to(device, non_blocking=True) if "doc_ids" in data else None
                y = model(x, labels=labels, doc_ids=doc_ids, **extra)
                if topo.is_last_stage:  # y: per-token loss [b, s]
                    if "loss_mask" in data:
                        y = y * data["loss_mask"].to(device=device, dtype=y.dtype, non_blocking=True)
                    y = y.sum()
                    loss_sum += y.detach().float()
                    y = y * (loss_scale / loss_divisor)
                else:  # y: hidden [b, s(/tp), hidden]
                    outbox_act[mb] = y.detach()
                if training:
                    saved[mb] = (None if topo.is_first_stage else x, y)
                    peak = max(peak, len(saved))
                    if len(saved) > limit:  # the schedule's memory promise, checked where memory is held
                        raise RuntimeError(f"stage {r} holds {len(saved)} microbatches' activations, over its bound {limit}")
        else:
            x, y = saved.pop(mb)
            if before_backward is not None:
                before_backward(mb, mb == last_backward_mb)
            with span(timeline, str(action), "backward", mb):
                grad = None if topo.is_last_stage else inbox_grad.pop(mb)
                torch.autograd.backward(y, grad_tensors=grad)
                if x is not None:
                    outbox_grad[mb] = x.grad
    assert not (inbox_act or inbox_grad or outbox_act or outbox_grad or saved), "the plan left tensors behind"

    if training:
        finalize_grads(model, topo)
        if grad_sync is not None:
            grad_sync()
    return PipelineResult(
        loss=_global_loss(loss_sum / loss_divisor, topo, reduce_loss_over_dp),
        microbatches=m,
        peak_in_flight=peak,
        in_flight_limit=limit,
        sends=comm.sends,
        recvs=comm.recvs,
    )


def _exchange(
    comm: StageComm,
    action: Exchange,
    inbox_act: dict[int, torch.Tensor],
    inbox_grad: dict[int, torch.Tensor],
    outbox_act: dict[int, torch.Tensor],
    outbox_grad: dict[int, torch.Tensor],
) -> None:
    """Carry out one batch of the plan: at most one transfer of each (op, peer) kind."""
    kw: dict[str, object] = {}
    recv_mb: dict[str, int] = {}
    for t in action.transfers:
        key = f"{t.op}_{t.peer}"
        assert key not in kw, f"two '{key}' transfers in one batch: {action}"
        if t.op == "send":
            kw[key] = (outbox_act if t.what == "act" else outbox_grad).pop(t.mb)
        else:
            kw[key] = True
            recv_mb[t.what] = t.mb
    from_prev, from_next = comm.exchange(**kw)
    if from_prev is not None:
        inbox_act[recv_mb["act"]] = from_prev
    if from_next is not None:
        inbox_grad[recv_mb["grad"]] = from_next


def _global_loss(local: torch.Tensor, topo: Topology, over_dp: bool) -> float:
    """The last stage's value on every rank of the pipeline, summed over dp replicas."""
    value = local.reshape(1).clone()
    if topo.pp > 1:
        dist.broadcast(value, src=topo.pp_last_rank, group=topo.pp_group)
    if over_dp and topo.dp > 1:
        all_reduce(value, topo.dp_group)
    return value.item()


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
    if isinstance(model, GPT) and (model.first_stage, model.last_stage) != (topo.is_first_stage, topo.is_last_stage):
        raise UserError(
            f"the model was built as first_stage={model.first_stage}, last_stage={model.last_stage} but this rank "
            f"is stage {topo.pp_rank} of {topo.pp}; build it with build_stage(cfg, topo)"
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
