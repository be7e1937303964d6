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

import math
from dataclasses import dataclass, fields

import torch
from torch import nn

from trident.errors import UserError
from trident.parallel.tensor.sharding import global_name, pieces_of
from trident.parallel.topology import Topology
from trident.parallel.zero.clip import (
    Exclude,
    NonFiniteGradientError,
    ShardNorm,
    clip_,
    clip_coefficient,
    default_exclude,
    resolve_nonfinite_policy,
)
from trident.parallel.zero.grad_buffer import GradBuffer
from trident.parallel.zero.mixed_precision import LossScaler, MixedPrecisionConfig, dtype_name
from trident.parallel.zero.state_layout import (
    KINDS,
    assemble,
    block_runs,
    entry_runs,
    gather_runs,
    overlap,
    piece_range,
    read_values,
    scatter_values,
    span,
)

STATE_FORMAT = "trident-optimizer/1"


@dataclass
class OptimizerConfig:
    """AdamW and ZeRO settings; the names match the training config's ``optim`` section."""

    lr: float = 3e-4
    """Learning rate of every group until a scheduler sets ``param_groups[i]["lr"]``."""
    weight_decay: float = 0.1
    """Decoupled weight decay (never on biases and norm weights)."""
    decay_embeddings: bool = True
    """Apply weight decay to the input and position embeddings."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    zero: int = 1
    """0 replicated, 1 sharded optimizer state, 2 also sharded gradients."""
    bucket_mb: float = 25.0
    """Size of a gradient-reduction bucket in MB of fp32 gradient."""
    overlap_grad_reduce: bool = True
    """Launch each bucket's reduction during backward as soon as its gradients are ready."""
    on_nonfinite: str = "auto"
    """inf/NaN gradients: skip the step, raise an error, or auto (skip under fp16, else error)."""

    def validate(self) -> "OptimizerConfig":
        if self.zero not in (0, 1, 2):
            raise UserError(f"optim.zero is {self.zero!r}; valid values are 0, 1, 2")
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
        resolve_nonfinite_policy(self.on_nonfinite, "fp32")
        return self

    @property
    def bucket_size(self) -> int:
        """Elements per bucket."""
        return max(1, int(self.bucket_mb * 2**20 / 4))

    @classmethod
    def from_section(cls, section: object) -> "OptimizerConfig":
        """Copy the fields of the training config's ``optim`` section that this config has."""
        names = {f.name for f in fields(cls)}
        return cls(**{n: getattr(section, n) for n in names if hasattr(section, n)}).validate()


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
    ) -> None:
        self.cfg = (config or OptimizerConfig()).validate()
        self.precision = (precision or MixedPrecisionConfig()).validate()
        self.topo = topo
        self.buffer = GradBuffer(model, topo, self.cfg.zero, self.cfg.bucket_size, self.cfg.overlap_grad_reduce)
        if self.buffer.param_dtype != self.precision.torch_dtype:
            raise UserError(
                f"the model's parameters are {dtype_name(self.buffer.param_dtype)} but precision.dtype is "
                f"{self.precision.dtype!r}; build the model with dtype={self.precision.torch_dtype}"
            )
        self.scaler = LossScaler.from_config(self.precision)
        self.nonfinite = resolve_nonfinite_policy(self.cfg.on_nonfinite, self.precision.dtype)
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

        # flat fp32 state for this rank's ranges of all buckets, with per-bucket views
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
            own = b.param_data[b.shard_start : b.shard_end]
            if self.master_is_param:
                self.master.append(own)
            else:
                m = self._master_flat[offset : offset + n]
                m.copy_(own.float())
                self.master.append(m)
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
            self.segments.append(segs)
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
                    f"set optim.on_nonfinite='skip' to skip such steps instead"
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
        shards = 1 if self.cfg.zero == 0 else self.topo.dp
        padding_share = -(-report["padding"] * per_elem // shards)
        report.update(
            zero=self.cfg.zero,
            dp=self.topo.dp,
            master_bytes=0 if self.master_is_param else shard * 4,
            optimizer_bytes=shard * per_elem,
            optimizer_padding_bytes=padding_share,
        )
        return report

    # --- state ------------------------------------------------------------------------------
    def _entries(self) -> list[tuple[dict, int, int]]:
        """(metadata, bucket index, offset of the entry's first local element in the bucket's
        state range) for every (parameter piece x owned range) of this rank."""
        out = []
        for i, b in enumerate(self.buffer.buckets):
            for slot in b.slots:
                s, e = max(b.shard_start, slot.start), min(b.shard_end, slot.start + slot.numel)
                if s >= e:
                    continue
                a, z = s - slot.start, e - slot.start  # flat range within the parameter
                shape = tuple(slot.param.shape)
                for piece in pieces_of(slot.param, slot.name.rpartition(".")[2]):
                    p0, p1 = piece_range(shape, piece, a, z)
                    if p0 == p1:
                        continue
                    gname = global_name(slot.name, piece)
                    meta = {
                        "key": f"{gname}@{slot.name}[{a}:{z}]",
                        "global_name": gname,
                        "global_shape": list(piece.global_shape),
                        "param": slot.name,
                        "local_shape": list(shape),
                        "local_range": [a, z],
                        "piece": {"dim": piece.dim, "start": piece.start, "length": piece.length,
                                  "local_start": piece.local_start, "replicas": piece.replicas},
                        "count": p1 - p0,
                        "duplicate": bool(self.exclude(slot.name, slot.param)),
                    }
                    out.append((meta, i, s - b.shard_start))
        return out

    def _local_runs(self, kind: int, meta: dict, i: int, off: int) -> list[torch.Tensor]:
        """Views of this rank's state `KINDS[kind]` that hold `meta`'s values, in stored order."""
        src = (self.master, self.exp_avg, self.exp_avg_sq)[kind][i]
        a, z = meta["local_range"]
        return entry_runs(meta, src[off : off + z - a], local=True)

    def state_dict(self) -> dict:
        """``{"tensors": {name: fp32 tensor}, "meta": JSON-able}`` — safetensors-ready.

        Each entry of ``meta["entries"]`` names the global tensor, the piece of it that
        the local parameter holds, and the parameter's flat element range this rank owns;
        the stored values are one contiguous range of the piece's elements (`entry_runs`
        finds them in the global tensor), which is all a resharding loader needs.
        """
        tensors: dict[str, torch.Tensor] = {}
        entries = []
        for meta, i, off in self._entries():
            for k, kind in enumerate(KINDS):
                tensors[f"{kind}/{meta['key']}"] = gather_runs(self._local_runs(k, meta, i, off), meta["count"])
            entries.append(meta)
        t = self.topo
        return {
            "tensors": tensors,
            "meta": {
                "format": STATE_FORMAT,
                "layout": {"tp": t.tp, "pp": t.pp, "dp": t.dp, "tp_rank": t.tp_rank, "pp_rank": t.pp_rank,
                           "dp_rank": t.dp_rank, "zero": self.cfg.zero},
                "step": self.step_count,
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
                "loss_scaler": self.scaler.state_dict(),
                "entries": entries,
            },
        }

    @torch.no_grad()
    def load_state_dict(self, states: dict | list[dict]) -> None:
        """Load from one or more ranks' `state_dict`s, saved at any layout and zero stage.

        Every element this rank owns must be present in `states` (its own state dict
        suffices at the same layout; give every rank's to change layout). Collective over
        dp (the updated parameters are all-gathered), so every rank must call it.

        A state's ``tensors`` is a dict of tensors or an open safetensors file (`safe_open`),
        which is read lazily (``get_slice``): only the stored entries, and of them only the
        element ranges, that overlap what this rank owns are read, so a resharding load
        costs about this rank's share of the state, not every rank's files.

        A saved entry holding exactly the elements a local entry needs (the same layout)
        is copied straight in; otherwise every saved entry of the same global tensor that
        overlaps it gives the overlap, read as one contiguous range of its stored values
        (`overlap`).
        """
        states = [states] if isinstance(states, dict) else list(states)
        for st in states:
            if st.get("meta", {}).get("format") != STATE_FORMAT:
                raise UserError(f"not an optimizer state of format {STATE_FORMAT!r}: {st.get('meta', {}).get('format')!r}")
        wanted: dict[str, list[tuple[dict, int, int]]] = {}
        for meta, i, off in self._entries():
            wanted.setdefault(meta["global_name"], []).append((meta, i, off))
        saved: dict[str, list[tuple[dict, dict]]] = {}
        for st in states:
            for meta in st["meta"]["entries"]:
                if meta["global_name"] in wanted:
                    saved.setdefault(meta["global_name"], []).append((meta, st["tensors"]))
        for gname, wants in wanted.items():
            sources = saved.get(gname, [])
            shape = wants[0][0]["global_shape"]
            for meta, _ in sources:
                if list(meta["global_shape"]) != list(shape):
                    raise UserError(f"the saved optimizer state holds {gname!r} with shape {meta['global_shape']}, "
                                    f"this model's is {shape}")
            exact = {span(meta): (meta, tensors) for meta, tensors in sources}
            for meta, i, off in wants:
                hit = exact.get(span(meta))
                if hit is not None:
                    src_meta, tensors = hit
                    for k, kind in enumerate(KINDS):
                        scatter_values(read_values(tensors, f"{kind}/{src_meta['key']}"), self._local_runs(k, meta, i, off))
                    continue
                if any(src["piece"]["dim"] != meta["piece"]["dim"] for src, _ in sources):
                    covered = self._load_assembled(meta, i, off, sources)  # sliced along another dim
                else:
                    covered = self._load_overlaps(meta, i, off, sources)
                if not covered:
                    raise UserError(
                        f"the given optimizer states lack elements of {gname!r} that dp rank {self.topo.dp_rank} "
                        f"(tp {self.topo.tp_rank}, pp {self.topo.pp_rank}) owns; pass the state dicts of every saved rank"
                    )
        meta0 = states[0]["meta"]
        self.step_count = int(meta0["step"])
        # the lr is restored (the schedule sets it every step anyway); the weight decay stays
        # the run's config value, so a resumed or imported run decays as its config says
        for group, saved_group in zip(self.param_groups, meta0["param_groups"]):
            group["lr"] = float(saved_group["lr"])
        self.scaler.load_state_dict(meta0["loss_scaler"])
        self.buffer.gather_params(self.master)

    def _load_overlaps(self, meta: dict, i: int, off: int, sources: list[tuple[dict, object]]) -> bool:
        """Fill local entry `meta` from the saved entries of its global tensor (sliced along
        the same dim) that overlap it, reading from each only the stored range spanning the
        overlap; returns whether every element was found. A saved entry whose overlap is
        already filled (a tp replica, a tied copy) is not read."""
        a, z = meta["local_range"]
        covered = torch.zeros(z - a, dtype=torch.bool)  # over the local flat range, like the state views
        for src, tensors in sources:
            ov = overlap(meta, src)
            if ov is None:
                continue
            q0, q1, row, local_base, local_stride, stored_base, stored_stride = ov
            mask = block_runs(covered, local_base, local_stride, row, q0, q1)
            if all(bool(r.all()) for r in mask):
                continue
            (o0, r0), (o1, r1) = divmod(q0, row), divmod(q1 - 1, row)
            lo, hi = stored_base + o0 * stored_stride + r0, stored_base + o1 * stored_stride + r1 + 1
            for k, kind in enumerate(KINDS):
                values = read_values(tensors, f"{kind}/{src['key']}", lo, hi)
                if values.numel() != hi - lo:
                    raise UserError(f"optimizer entry {src['key']!r} stores fewer values than its metadata says")
                state = (self.master, self.exp_avg, self.exp_avg_sq)[k][i][off : off + z - a]
                for dst, val in zip(block_runs(state, local_base, local_stride, row, q0, q1),
                                    block_runs(values, stored_base - lo, stored_stride, row, q0, q1)):
                    dst.copy_(val)
            for r in mask:
                r.fill_(True)
        return all(bool(r.all()) for r in entry_runs(meta, covered, local=True))

    def _load_assembled(self, meta: dict, i: int, off: int, sources: list[tuple[dict, object]]) -> bool:
        """Fill local entry `meta` from its whole global tensor, assembled from every saved
        entry of it (read whole): for saved pieces cut along another dim than the local one."""
        full = assemble(sources, math.prod(meta["global_shape"]))
        if not all(bool(r.all()) for r in entry_runs(meta, full[-1])):
            return False
        for k in range(len(KINDS)):
            for dst, src in zip(self._local_runs(k, meta, i, off), entry_runs(meta, full[k])):
                dst.copy_(src)
        return True
