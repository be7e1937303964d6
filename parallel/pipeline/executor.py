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

* ``before_backward(mb, is_last)`` is called right before each microbatch's backward
  (each chunk's, with virtual stages); ``is_last`` is True exactly once per step, for the
  final backward of this stage. A gradient buffer that reduces buckets from autograd
  hooks, overlapped with the backward, arms itself when ``is_last`` is True and stays
  quiet otherwise (Megatron's ``no_sync``). Under a split-backward schedule (ZB-H1) weight
  gradients arrive in the W steps after the last B, so no call is marked last and the
  whole reduction runs in ``grad_sync``, after every W (no overlap with the backward).
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
attributes (checked against the topology). With virtual stages (``vpp`` > 1) it is also
given ``chunk=c`` and holds the chunks c·pp + pp_rank; chunk 0 of the first rank takes the
tokens, the last chunk of the last rank returns the loss. `trident.model.stage.build_stage`
builds one. The per-step state (inboxes, outboxes, what a backward needs, the freed
outputs, the W work) lives in `parallel.pipeline.stage_run`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from trident.errors import UserError
from trident.parallel.collectives import all_reduce, all_reduce_coalesced
from trident.parallel.context.sharding import shard_microbatch
from trident.parallel.pipeline.p2p import StageComm
from trident.parallel.pipeline.schedule import SCHEDULES, SPLIT_BACKWARD, Action, Exchange, check_layout
from trident.parallel.pipeline.schedule import forward_only as forward_only_steps
from trident.parallel.pipeline.schedule import peak_in_flight, plan, schedule_steps
from trident.parallel.pipeline.stage_run import Microbatch, StageRun
from trident.parallel.pipeline.timeline import Timeline
from trident.parallel.tensor.layers import sync_tp_partial_grads
from trident.parallel.tensor.sharding import is_pipeline_tied, is_zero3_sharded, reduction_grad
from trident.parallel.topology import Topology
from trident.parallel.zero.units import UnitHooks


def finalize_grads(model: nn.Module, topo: Topology) -> None:
    """Sum the partial gradients a stage holds after its last backward: tp-partial
    parameters over tp, then both copies of a tied embedding over the embedding group."""
    sync_tp_partial_grads(model, topo)
    if topo.pp == 1:
        return
    # ZeRO-3 holds no full gradient here: it sums the tied shards itself (sharded_params)
    tied = [p for p in model.parameters() if is_pipeline_tied(p) and not is_zero3_sharded(p)]
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
    held_bytes_peak: int = 0  # most bytes of stage inputs/outputs held at once (`StageRun.held_bytes`)

    @property
    def loss(self) -> float:
        """The loss as a number. Reading it waits for the device (a host-device sync), so the
        step does not read it: the trainer does, after the optimizer step's own sync."""
        return float(self.loss_tensor.item())


def run_pipeline(
    model: nn.Module,
    topo: Topology,
    microbatches: Sequence[Microbatch],
    *,
    act_shape: tuple[int, ...],
    loss_divisor: float,
    schedule: str = "1f1b",
    vpp: int = 1,
    forward_only: bool = False,
    grad_sync: Callable[[], None] | None = None,
    before_backward: Callable[[int, bool], None] | None = None,
    timeline: Timeline | None = None,
    label_smoothing: float = 0.0,
    reduce_loss_over_dp: bool = True,
    loss_scale: float = 1.0,
    free_outputs: bool = True,
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
    schedule, vpp: a name of `SCHEDULES` and the virtual stages per rank (interleaved:
        the model holds vpp chunks and is called with ``chunk=c``).
    forward_only: evaluation; no activations kept, no gradients, no hooks called.
    loss_scale: fp16 dynamic loss scale; only the back-propagated loss is multiplied by it
        (the returned loss is the true one), the optimizer unscales the gradients.
    free_outputs: release each output's storage once sent (Megatron's deallocation); off
        only to measure what that saves (`PipelineResult.held_bytes_peak`).
    """
    p, r, m = topo.pp, topo.pp_rank, len(microbatches)
    _check_args(model, topo, microbatches, act_shape, loss_divisor, schedule, vpp)
    # context parallelism: this rank runs its s/cp tokens of every sample (doc_ids stay whole)
    microbatches = [shard_microbatch(dict(mb), topo.cp, topo.cp_rank) for mb in microbatches]
    training = not forward_only
    split = training and schedule in SPLIT_BACKWARD
    steps = schedule_steps(schedule, p, r, m, vpp) if training else forward_only_steps(p, r, m, vpp)
    act_dtype = next((q.dtype for q in model.parameters() if q.is_floating_point()), torch.float32)
    run = StageRun(
        model, topo, microbatches, StageComm(topo, act_shape, act_dtype, topo.device, ring=vpp > 1), vpp,
        loss_divisor, loss_scale, training, split, before_backward, timeline,
        {"label_smoothing": label_smoothing} if label_smoothing else {},
        # a split backward leaves weight gradients for later Ws: no B is the last one, and
        # the dp reduction starts in grad_sync, after every W
        last_backward=None if split else next((st.key for st in reversed(steps) if st.kind == "B"), None),
        limit=peak_in_flight(steps), free_outputs=free_outputs,
    )
    _carry_out(run, plan(steps, r, p, vpp), getattr(model, "unit_hooks", None))
    if training:
        topo.heartbeat.waiting("finalize grads (tp, tied-embedding all-reduce)")
        finalize_grads(model, topo)
        if grad_sync is not None:
            grad_sync()
    topo.heartbeat.waiting("loss broadcast and all-reduce")
    return PipelineResult(
        loss_tensor=_global_loss(run.loss_sum / loss_divisor, topo, reduce_loss_over_dp),
        microbatches=m,
        peak_in_flight=run.peak,
        in_flight_limit=run.limit if training else 0,
        sends=run.comm.sends,
        recvs=run.comm.recvs,
        held_bytes_peak=run.held_peak,
    )


def _carry_out(run: StageRun, actions: Sequence[Action], units: UnitHooks | None) -> None:
    """Run a plan's actions in order. Parameter units sharded over dp (ZeRO-3's
    `begin_action`) are told before each step which step runs units next (the next F or B;
    a W only computes stored weight gradients), so they can prefetch across the switch."""
    compute = {"F": run.forward, "B": run.backward, "W": run.weight}
    following: dict[int, tuple[str, int] | None] = {}
    ahead = None
    for action in reversed(actions):
        if not isinstance(action, Exchange):
            following[id(action)] = ahead
            ahead = (action.kind, action.chunk) if action.kind in "FB" else ahead
    for action in actions:
        if isinstance(action, Exchange):
            run.exchange(action)
        else:
            if units is not None:
                units.begin_action((action.kind, action.chunk), following[id(action)])
            compute[action.kind](action)
        run.note_held()
    run.check_drained()


def _global_loss(local: torch.Tensor, topo: Topology, over_dp: bool) -> torch.Tensor:
    """The last stage's value on every rank of the pipeline, summed over the cp ranks (each
    holds part of every sequence's tokens) and over dp replicas."""
    value = local.reshape(1).clone()
    if topo.pp > 1:
        dist.broadcast(value, src=topo.pp_last_rank, group=topo.pp_group)
    if over_dp and topo.dp_cp > 1:
        all_reduce(value, topo.dp_cp_group)
    elif topo.cp > 1:
        all_reduce(value, topo.cp_group)
    return value


def _check_args(
    model: nn.Module,
    topo: Topology,
    microbatches: Sequence[Microbatch],
    act_shape: tuple[int, ...],
    loss_divisor: float,
    schedule: str,
    vpp: int,
) -> None:
    """Local checks that every rank makes identically, before its first transfer."""
    m = len(microbatches)
    if m < 1:
        raise UserError("a pipeline step needs at least one microbatch, got 0")
    if schedule not in SCHEDULES:
        raise UserError(f"unknown pipeline schedule {schedule!r}; valid schedules are {', '.join(SCHEDULES)}")
    check_layout(schedule, topo.pp, m, vpp)
    if vpp > 1 and getattr(model, "vpp", vpp) != vpp:
        raise UserError(f"the model was built with {getattr(model, 'vpp')} chunks per rank but the schedule has vpp={vpp}")
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
