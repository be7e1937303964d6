"""The distributed AdamW optimizer: fp32 master weights, ZeRO-sharded state, one step.

It owns the model's `GradBuffer` (bucketed dp reduction), the loss scaler and the
global-norm clipping, and steps AdamW on flat fp32 tensors:

* zero 0: every rank holds the whole state and steps everything (replicated AdamW);
* zero 1: rank r of the dp group owns the r-th 1/dp slice of every gradient bucket: its
  fp32 master weights, exp_avg and exp_avg_sq exist only for that slice, the gradients
  are reduce-scattered into it, the rank steps it, and the updated parameters are
  all-gathered into the model (Megatron's distributed optimizer, DeepSpeed ZeRO-1);
* zero 2: as zero 1, and the full gradient buffer is freed after the reduction.

fp32 models keep no separate master copy: the parameter buffer *is* the fp32 master
(each rank updates its slice in place). bf16/fp16 models keep an fp32 master slice and
receive a rounded copy after each step.

The training loop, one step (the pipeline executor makes the middle calls)::

    opt.zero_grad()
    for mb in range(n):
        opt.before_backward(mb, is_last=(mb == n - 1))
        opt.scale_loss(loss_mb).backward()      # loss_mb normalised by global tokens
    finalize_grads(model, topo)                 # tp-partial and tied-embedding sums
    opt.grad_sync()                             # finish the dp reduction
    result = opt.step()                         # unscale, norm, clip, AdamW, all-gather
    if result.stepped: scheduler advances

Weight decay is decoupled (AdamW) and never applied to 1-D parameters (biases and norm
weights) nor, when ``decay_embeddings`` is off, to the input and position embeddings.

Checkpoints store the state by global tensor name: each entry says which elements of
which global tensor (via the parameter's `Piece`) the stored values are, so a state
saved at one (tp, pp, dp, zero) loads at another (`load_state_dict` accepts the state
dicts of any set of ranks and takes the elements this rank owns; `state_layout` has the
geometry of where those elements lie).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from trident.errors import UserError
from trident.parallel.topology import Topology
from trident.parallel.zero import optimizer_state
from trident.parallel.zero.clip import (
    Exclude,
    NonFiniteGradientError,
    ShardNorm,
    clip_,
    clip_coefficient,
    default_exclude,
    resolve_nonfinite_policy,
)
from trident.parallel.zero.grad_buffer import Bucket, GradBuffer
from trident.parallel.zero.mixed_precision import LossScaler, MixedPrecisionConfig, dtype_name
from trident.parallel.zero.sharded_params import ShardedParams


@dataclass
class OptimizerConfig:
    """AdamW and ZeRO settings. The run config's ``optim`` section *is* this class (a
    subclass that adds the learning-rate schedule and loss-scale keys), so every field is
    declared and documented once, here."""

    lr: float = 3e-4
    """Peak learning rate, reached at the end of warm-up (the schedule sets each step's)."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (never on biases and norm weights)."""
    decay_embeddings: bool = True
    """Apply weight decay to the input token and position embeddings (and so to a tied
    output head, which is the token embedding); an untied output head is always decayed."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    zero: int = 1
    """ZeRO stage: 0 replicated optimizer, 1 sharded optimizer state, 2 also sharded gradients,
    3 also sharded parameters (gathered per unit: a block, the embedding, the head; FSDP)."""
    zero3_reshard_after_forward: bool = True
    """ZeRO-3: free a unit's gathered parameters after its forward and gather them again for
    its backward (least memory); false keeps them gathered from a unit's first use in a step
    to the step's end (one all-gather per unit per step: for pipeline stages that run many
    microbatches)."""
    bucket_mb: float = 25.0
    """Size of a gradient-reduction bucket, in MB of fp32 gradient."""
    overlap_grad_reduce: bool = True
    """Launch each bucket's reduction during backward as soon as its gradients are ready
    (ZeRO-3: prefetch the next unit's parameters and keep reduce-scatters in flight)."""

    def validate(self) -> "OptimizerConfig":
        if self.zero not in (0, 1, 2, 3):
            raise UserError(f"optim.zero is {self.zero!r}; valid values are 0, 1, 2, 3")
        positive = (("lr", self.lr, True), ("eps", self.eps, False), ("bucket_mb", self.bucket_mb, False))
        for name, value, zero_ok in positive:
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
                raise UserError(f"optim.{name}={value!r} must be a finite number {'>= 0' if zero_ok else '> 0'}")
        for name in ("weight_decay", "clip_grad"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise UserError(f"optim.{name}={value!r} must be a finite number >= 0")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise UserError(f"optim.{name}={value!r} must be in [0, 1)")
        return self

    @property
    def bucket_size(self) -> int:
        """Elements per bucket."""
        return max(1, int(self.bucket_mb * 2**20 / 4))


@dataclass
class StepResult:
    stepped: bool
    """False when the step was skipped (inf/NaN gradients): parameters, optimizer state
    and step count are untouched, and the LR schedule must not advance."""
    grad_norm: float
    """The whole model's gradient norm before clipping (after unscaling)."""
    clip_coef: float
    """The factor the gradients were multiplied by (1.0 when not clipped)."""
    loss_scale: float
    """The loss scale to use for the next step."""


# --- parameter groups ---------------------------------------------------------------------
def is_embedding(name: str) -> bool:
    """Input token and position embeddings (the untied output head is not one)."""
    parts = name.split(".")
    return parts[-1] == "pos_embedding" or (len(parts) >= 2 and parts[-2] == "embedding")


def uses_weight_decay(name: str, param: nn.Parameter, decay_embeddings: bool) -> bool:
    """Megatron's rule: no decay on 1-D tensors (biases, norm weights), optionally none on
    embeddings; decay on every other matrix."""
    if param.dim() < 2:
        return False
    return decay_embeddings or not is_embedding(name)


def split_decay(model: nn.Module, decay_embeddings: bool) -> tuple[list[str], list[str]]:
    """Names of the trainable parameters (decay, no_decay), in model order; tests build the
    reference torch.optim.AdamW groups from this too."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if uses_weight_decay(name, p, decay_embeddings) else no_decay).append(name)
    return decay, no_decay


# --- the optimizer ------------------------------------------------------------------------
class DistributedOptimizer:
    """AdamW over a `GradBuffer`, with ZeRO 0/1/2, loss scaling and global-norm clipping."""

    def __init__(
        self,
        model: nn.Module,
        topo: Topology,
        config: OptimizerConfig | None = None,
        precision: MixedPrecisionConfig | None = None,
        exclude_from_norm: Exclude | None = None,
        on_nonfinite: str = "auto",
    ) -> None:
        """`on_nonfinite`: inf/NaN gradients skip the step (``skip``), raise (``error``), or
        ``auto`` (skip under fp16, where overflow is routine; raise otherwise)."""
        self.cfg = (config or OptimizerConfig()).validate()
        self.precision = (precision or MixedPrecisionConfig()).validate()
        self.topo = topo
        if self.cfg.zero == 3:  # parameters sharded too, gathered per unit of the model
            self.buffer: GradBuffer | ShardedParams = ShardedParams(
                model, topo, self.cfg.zero3_reshard_after_forward, prefetch=self.cfg.overlap_grad_reduce
            )
        else:
            self.buffer = GradBuffer(model, topo, self.cfg.zero, self.cfg.bucket_size, self.cfg.overlap_grad_reduce)
        if self.buffer.param_dtype != self.precision.torch_dtype:
            raise UserError(
                f"the model's parameters are {dtype_name(self.buffer.param_dtype)} but precision.dtype is "
                f"{self.precision.dtype!r}; build the model with dtype={self.precision.torch_dtype}"
            )
        self.scaler = LossScaler.from_config(self.precision)
        self.nonfinite = resolve_nonfinite_policy(on_nonfinite, self.precision.dtype)
        self.norm = ShardNorm(self.buffer, topo, exclude_from_norm)
        self.exclude = exclude_from_norm or default_exclude
        self.step_count = 0

        decay, _ = split_decay(model, self.cfg.decay_embeddings)
        decay_set = set(decay)
        self.param_groups: list[dict] = [
            {"name": "decay", "lr": self.cfg.lr, "weight_decay": self.cfg.weight_decay, "params": []},
            {"name": "no_decay", "lr": self.cfg.lr, "weight_decay": 0.0, "params": []},
        ]
        for slot in self.buffer.slots.values():
            self.param_groups[0 if slot.name in decay_set else 1]["params"].append(slot.name)

        self._build_state(decay_set)

    def _build_state(self, decay_set: set[str]) -> None:
        """Flat fp32 state for this rank's ranges of all buckets, with per-bucket views, and
        the (start, end, param group) segments of each range."""
        sizes = [b.shard_end - b.shard_start for b in self.buffer.buckets]
        total, dev = sum(sizes), self.buffer.device
        self._exp_avg_flat = torch.zeros(total, dtype=torch.float32, device=dev)
        self._exp_avg_sq_flat = torch.zeros(total, dtype=torch.float32, device=dev)
        self.master_is_param = self.buffer.param_dtype == torch.float32
        self._master_flat = None if self.master_is_param else torch.empty(total, dtype=torch.float32, device=dev)
        self.exp_avg: list[torch.Tensor] = []
        self.exp_avg_sq: list[torch.Tensor] = []
        self.master: list[torch.Tensor] = []
        self.segments: list[list[tuple[int, int, int]]] = []  # (start, end, group) per bucket
        offset = 0
        for b, n in zip(self.buffer.buckets, sizes):
            self.exp_avg.append(self._exp_avg_flat[offset : offset + n])
            self.exp_avg_sq.append(self._exp_avg_sq_flat[offset : offset + n])
            own = self.buffer.owned_params(b)
            if self.master_is_param:
                self.master.append(own)
            else:
                m = self._master_flat[offset : offset + n]
                m.copy_(own.float())
                self.master.append(m)
            self.segments.append(_group_segments(b, decay_set))
            offset += n

    # --- the step protocol ------------------------------------------------------------------
    def zero_grad(self) -> None:
        self.buffer.zero_grad()

    def before_backward(self, mb: int, is_last: bool) -> None:
        """The pipeline executor's ``before_backward`` hook."""
        self.buffer.before_backward(mb, is_last)

    def grad_sync(self) -> None:
        """The pipeline executor's ``grad_sync`` hook: complete the dp reduction."""
        self.buffer.finish_grad_sync()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """What to call backward on: the loss times the fp16 loss scale (else the loss)."""
        return self.scaler.scale_loss(loss)

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale

    def set_lr(self, lr: float) -> None:
        for group in self.param_groups:
            group["lr"] = lr

    @torch.no_grad()
    def step(self) -> StepResult:
        """Unscale, measure the global norm, skip or clip, step AdamW, publish parameters.

        Every rank returns the same `StepResult`; on ``stepped=False`` nothing changed but
        the loss scale.
        """
        self.buffer.finish_grad_sync()
        grads = [b.main_grad for b in self.buffer.buckets]
        if self.scaler.scale != 1.0:
            inv = self.scaler.inv_scale
            for g in grads:
                g.mul_(inv)
        norm, found_inf = self.norm.global_norm()
        if found_inf:
            if self.nonfinite == "error":
                raise NonFiniteGradientError(
                    f"the global gradient norm is {norm} (inf/NaN gradients) at step {self.step_count + 1}; "
                    "set train.nonfinite=skip to skip such steps instead"
                )
            self.scaler.update(found_inf=True)
            return StepResult(stepped=False, grad_norm=norm, clip_coef=1.0, loss_scale=self.scaler.scale)
        coef = clip_coefficient(norm, self.cfg.clip_grad)
        clip_(grads, coef)
        self.step_count += 1
        for i, g in enumerate(grads):
            self._adamw(i, g)
        self.buffer.gather_params(self.master)
        self.scaler.update(found_inf=False)
        return StepResult(stepped=True, grad_norm=norm, clip_coef=coef, loss_scale=self.scaler.scale)

    def _adamw(self, i: int, grad: torch.Tensor) -> None:
        """AdamW on one bucket's owned range through torch's fused kernel (the one behind
        ``torch.optim.AdamW(fused=True)``, on CPU and CUDA): one pass over memory instead of
        the eight of separate operations. One call per parameter group, with every segment
        of that group as a view; bucket padding belongs to no segment and stays 0."""
        master, m, v = self.master[i], self.exp_avg[i], self.exp_avg_sq[i]
        by_group: dict[int, list[tuple[int, int]]] = {}
        for s, e, gi in self.segments[i]:
            by_group.setdefault(gi, []).append((s, e))
        step = torch.tensor(float(self.step_count), device=master.device)
        for gi, ranges in by_group.items():
            group = self.param_groups[gi]
            torch._fused_adamw_(
                [master[s:e] for s, e in ranges], [grad[s:e] for s, e in ranges],
                [m[s:e] for s, e in ranges], [v[s:e] for s, e in ranges], [], [step] * len(ranges),
                lr=float(group["lr"]), beta1=self.cfg.beta1, beta2=self.cfg.beta2,
                weight_decay=float(group["weight_decay"]), eps=self.cfg.eps, amsgrad=False, maximize=False,
            )

    # --- bookkeeping ------------------------------------------------------------------------
    def memory(self) -> dict[str, int]:
        """Per-rank bytes for the training log and the memory planner.

        ``optimizer_bytes`` is exp_avg + exp_avg_sq (+ the fp32 master slice when the
        model is not fp32; an fp32 model's parameters are its master weights), which is
        total/dp plus at most ``optimizer_padding_bytes`` (this rank's share of the bucket
        padding); ``grad_bytes`` is what persists between
        steps (zero 2 also holds ``grad_peak_bytes`` during the last backward).
        """
        report = dict(self.buffer.memory())
        shard = report["shard_numel"]
        per_elem = 4 * (2 if self.master_is_param else 3)
        # every rank holds the same shard size; what exceeds total/dp is padding's share
        shards = 1 if self.cfg.zero == 0 else self.topo.dp_cp
        padding_share = -(-report["padding"] * per_elem // shards)
        report.update(
            zero=self.cfg.zero,
            dp=self.topo.dp,
            master_bytes=0 if self.master_is_param else shard * 4,
            optimizer_bytes=shard * per_elem,
            optimizer_padding_bytes=padding_share,
        )
        return report

    def full_parameters(self, write_back: bool = False) -> contextlib.AbstractContextManager:
        """The model's parameters whole for the body (a checkpoint save or load): ZeRO-3
        gathers every unit (`write_back`: what the body wrote becomes the shards); other
        stages hold them whole anyway."""
        if isinstance(self.buffer, ShardedParams):
            return self.buffer.full_parameters(write_back)
        return contextlib.nullcontext()

    # --- state (`trident.parallel.zero.optimizer_state`) ----------------------------------------
    def state_dict(self) -> dict:
        """``{"tensors": {name: fp32 tensor}, "meta": JSON-able}``: safetensors-ready."""
        return optimizer_state.state_dict(self)

    def load_state_dict(self, states: dict | list[dict]) -> None:
        """Load from one or more ranks' `state_dict`s, saved at any layout and zero stage
        (collective over dp: every rank must call it)."""
        optimizer_state.load_state_dict(self, states)


def _group_segments(b: Bucket, decay_set: set[str]) -> list[tuple[int, int, int]]:
    """Maximal runs of a bucket's owned range that belong to one param group (0 decay,
    1 no decay), relative to the range's start: AdamW steps each run in one call."""
    segs: list[tuple[int, int, int]] = []
    for slot in b.slots:
        s, e = max(b.shard_start, slot.start), min(b.shard_end, slot.start + slot.numel)
        if s < e:
            g = 0 if slot.name in decay_set else 1
            s, e = s - b.shard_start, e - b.shard_start
            if segs and segs[-1][1] == s and segs[-1][2] == g:
                segs[-1] = (segs[-1][0], e, g)
            else:
                segs.append((s, e, g))
    return segs
