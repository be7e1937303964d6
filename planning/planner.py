"""Will it fit, and how fast will it go? A layout's memory, FLOPs, traffic and step time.

`make_plan` predicts, from the config alone (no model is built, nothing is allocated):

* per pipeline stage, each rank's parameters, gradients, optimizer state and peak
  activations (`trident.planning.plan_memory`, checked against measured steps by
  tests/test_memory_plan.py), and the peak total, which counts the full fp32 gradient
  buffer at ZeRO-2 too (it lives through the backward passes of a step);
* the step's FLOPs: the model FLOPs of `trident.training.metrics.flops_per_token` (what
  MFU is computed from) and the hardware FLOPs, which add what recomputation repeats
  (full: every layer's forward; selective: the attention scores and weighted sum);
* the bytes each rank sends per step in each group: tp (the layers' all-reduces, or
  all-gathers and reduce-scatters under sequence parallelism, forward and backward,
  again for a full recomputation), pp (activations forward, gradients backward), dp
  (gradient all-reduce at ZeRO-0; reduce-scatter plus the parameter all-gather at
  ZeRO-1/2), and the tied-embedding gradient sum between first and last stage. Ring
  algorithms: an all-reduce of n bytes over g ranks sends 2 (g-1)/g n per rank, an
  all-gather or reduce-scatter (g-1)/g n;
* a step time from a roofline with declared device figures (`DEVICES`): each stage's
  microbatch takes max(FLOPs / achievable peak, bytes / memory bandwidth) plus its tp and pp
  transfers (on NVLink inside a node, the network across nodes; Megatron's rank order
  keeps tp innermost), the 1F1B pipeline runs (m + pp - 1) slots of the slowest stage,
  the dp reduction is exposed beyond the last microbatch's backward, and the optimizer
  streams its state once. It is a model, not a measurement: use it to rank layouts.

`search` enumerates every layout of N devices the model allows, keeps those whose every
stage fits the device memory, and orders them by predicted tokens/s.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from trident.errors import UserError
from trident.model.config import ModelConfig
from trident.parallel.tensor.layers import padded_vocab_size
from trident.parallel.pipeline.stages import stage_layers
from trident.training.config import RECOMPUTE, Config
from trident.training.metrics import PEAK_TFLOPS, flops_per_token
from trident.planning.plan_memory import (
    DTYPE_BYTES,
    ActivationBytes,
    Shapes,
    StateBytes,
    stage_activation_bytes,
    stage_params,
    state_bytes,
)


# --- devices ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Device:
    """Declared figures of one accelerator and its links (vendor datasheets)."""

    name: str
    memory_bytes: int
    hbm_gbps: float  # memory bandwidth, GB/s
    intra_gbps: float  # per-device bandwidth to a peer in the same node, one direction, GB/s
    inter_gbps: float  # per-device network bandwidth across nodes, one direction, GB/s
    per_node: int  # devices per node
    latency_us: float = 10.0  # fixed cost of one collective or transfer
    kind: str = "cuda"  # what the activation accounting assumes (kernels, dropout masks)
    matmul_efficiency: float = 0.75  # the fraction of peak that large dense matmuls reach

    def peak_tflops(self, dtype: str) -> float:
        """The declared dense peak (`trident.training.metrics.PEAK_TFLOPS`), what MFU divides by."""
        peaks = PEAK_TFLOPS.get(self.name, {})
        return peaks.get(dtype) or peaks.get("fp32") or CPU_NOMINAL_TFLOPS


CPU_NOMINAL_TFLOPS = 1.0  # a nominal figure for the CPU entry; measure with `trident bench`

# H100/H200 SXM: 900 GB/s NVLink (450 each way), 3.35 / 4.8 TB/s HBM, 400 Gb/s NDR per GPU.
# A100 SXM4 80GB: 600 GB/s NVLink (300 each way), 2.04 TB/s HBM, 200 Gb/s HDR per GPU.
DEVICES: dict[str, Device] = {
    "H100": Device("H100", 80 * 10**9, 3350.0, 450.0, 50.0, 8),
    "H200": Device("H200", 141 * 10**9, 4800.0, 450.0, 50.0, 8),
    "A100": Device("A100", 80 * 10**9, 2039.0, 300.0, 25.0, 8),
    "cpu": Device("cpu", 64 * 10**9, 50.0, 10.0, 10.0, 1, latency_us=50.0, kind="cpu"),
}


def get_device(name: str) -> Device:
    if name not in DEVICES:
        raise UserError(f"unknown device {name!r}; valid devices are {', '.join(DEVICES)}")
    return DEVICES[name]


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'80GB' (10^9), '80GiB' (2^30), '512MB', '1.5TB' or a plain number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise UserError(f"device memory {text!r} is not a size; write it like 80GB, 80GiB or 512MB")
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# --- the plan ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """Everything a prediction depends on besides the model config."""

    tp: int
    pp: int
    dp: int
    zero: int
    recompute: str
    micro_batch_size: int
    seq_len: int
    global_batch_size: int
    sequence_parallel: bool
    dtype: str
    schedule: str = "1f1b"
    split: tuple[int, ...] | None = None
    bucket_mb: float = 25.0
    doc_masking: bool = True
    overlap_grad_reduce: bool = True

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    @property
    def sp(self) -> bool:
        return self.sequence_parallel and self.tp > 1


@dataclass
class StagePlan:
    """One rank of pipeline stage `stage` (every tp and dp rank of a stage holds the same)."""

    stage: int
    layers: range
    state: StateBytes
    activations: ActivationBytes

    @property
    def param_bytes(self) -> int:
        return self.state.param_bytes

    @property
    def grad_bytes(self) -> int:
        return self.state.grad_bytes

    @property
    def optimizer_bytes(self) -> int:
        return self.state.optimizer_bytes

    @property
    def activation_bytes(self) -> int:
        return self.activations.peak

    @property
    def measurable_bytes(self) -> int:
        """What a rank's `MemoryReport.total_bytes` measures: state plus saved activations."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes

    @property
    def peak_bytes(self) -> int:
        """The step's peak: the full gradient buffer during backward, and the stage
        inputs/outputs the pipeline executor holds besides autograd's saved tensors."""
        return (self.param_bytes + self.state.grad_peak_bytes + self.optimizer_bytes + self.activation_bytes
                + self.activations.pipeline_buffer)


@dataclass
class Plan:
    settings: Settings
    device: Device
    stages: list[StagePlan]
    model_flops: float  # per step, whole job, no recomputation (what MFU counts)
    hardware_flops: float  # per step, whole job, with recomputation
    comm_bytes: dict[str, float]  # bytes one rank sends per step, by group (the busiest rank)
    step_time_s: float
    breakdown: dict[str, float] = field(default_factory=dict)  # seconds, by part

    @property
    def peak_bytes(self) -> int:
        return max(s.peak_bytes for s in self.stages)

    @property
    def tokens_per_s(self) -> float:
        return self.settings.global_batch_size * self.settings.seq_len / self.step_time_s

    @property
    def mfu(self) -> float:
        peak = self.device.peak_tflops(self.settings.dtype) * 1e12
        return self.model_flops / (self.step_time_s * self.settings.world * peak)

    def fits(self, memory_bytes: int) -> bool:
        return self.peak_bytes <= memory_bytes


def settings_from_config(cfg: Config, **overrides: object) -> Settings:
    """The config's layout and batch, with `overrides` (None values are ignored)."""
    t, p = cfg.train, cfg.parallel
    values = dict(
        tp=p.tp, pp=p.pp, dp=p.dp or 1, zero=cfg.optim.zero, recompute=t.recompute,
        micro_batch_size=t.micro_batch_size, seq_len=cfg.data.seq_len, global_batch_size=t.global_batch_size,
        sequence_parallel=p.sequence_parallel, dtype=t.dtype, schedule=p.pp_schedule,
        split=tuple(p.pp_split) if p.pp_split else None, bucket_mb=cfg.optim.bucket_mb,
        doc_masking=cfg.data.doc_masking, overlap_grad_reduce=cfg.optim.overlap_grad_reduce,
    )
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)  # type: ignore[arg-type]


def check(model: ModelConfig, st: Settings) -> None:
    """The layout checks training makes, as one sentence each, before any arithmetic."""
    for name in ("tp", "pp", "dp", "micro_batch_size", "seq_len", "global_batch_size"):
        value = getattr(st, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{name} must be a whole number >= 1, got {value!r}")
    if st.zero not in (0, 1, 2):
        raise UserError(f"zero is {st.zero!r}; valid values are 0, 1, 2")
    if st.recompute not in RECOMPUTE:
        raise UserError(f"recompute is {st.recompute!r}; valid values are {', '.join(RECOMPUTE)}")
    if st.dtype not in DTYPE_BYTES:
        raise UserError(f"dtype is {st.dtype!r}; valid values are {', '.join(DTYPE_BYTES)}")
    model.check_tp(st.tp)
    stage_layers(model.n_layers, st.pp, st.split)
    if st.seq_len > model.max_seq_len:
        raise UserError(f"seq_len={st.seq_len} exceeds model.max_seq_len={model.max_seq_len}")
    per_step = st.micro_batch_size * st.dp
    if st.global_batch_size % per_step != 0:
        raise UserError(
            f"global batch size {st.global_batch_size} is not a multiple of micro batch size x dp = "
            f"{st.micro_batch_size} x {st.dp} = {per_step}"
        )
    if st.sp and st.seq_len % st.tp != 0:
        raise UserError(f"seq_len={st.seq_len} is not divisible by tp={st.tp} (sequence parallelism)")


def make_plan(model: ModelConfig, st: Settings, device: Device | str = "H100") -> Plan:
    """Memory per stage, FLOPs, communication and predicted step time of one layout."""
    device = get_device(device) if isinstance(device, str) else device
    check(model, st)
    m = st.microbatches
    shapes = Shapes(model, st.micro_batch_size, st.seq_len, st.tp, st.sp, st.dtype, device.kind, st.doc_masking)
    stages = []
    for r, layers in enumerate(stage_layers(model.n_layers, st.pp, st.split)):
        params = stage_params(model, st.tp, st.pp, r, st.sequence_parallel, st.split)
        state = state_bytes(params, st.dp, st.zero, st.dtype, st.bucket_mb)
        in_flight = min(st.pp - r, m) if st.schedule == "1f1b" else m
        act = stage_activation_bytes(shapes, len(layers), r == 0, r == st.pp - 1, in_flight, st.recompute)
        stages.append(StagePlan(r, layers, state, act))
    tokens = st.global_batch_size * st.seq_len
    model_flops = flops_per_token(model, st.seq_len) * tokens
    hardware_flops = model_flops + _recompute_flops_per_token(model, st) * tokens
    comm = _comm_bytes(model, st, stages)
    time_s, breakdown = _step_time(model, st, device, stages, comm)
    return Plan(st, device, stages, model_flops, hardware_flops, comm, time_s, breakdown)


# --- FLOPs ------------------------------------------------------------------------------------
def _layer_matmul_params(model: ModelConfig) -> int:
    h, f, kv_dim = model.hidden, model.ffn, model.kv_heads * model.head_dim
    return h * (h + 2 * kv_dim) + h * h + (3 if model.activation == "swiglu" else 2) * h * f


def _recompute_flops_per_token(model: ModelConfig, st: Settings) -> float:
    """Forward FLOPs per token that recomputation repeats in backward."""
    attention = 4.0 * model.n_layers * model.hidden * st.seq_len  # QK^T and PV, forward
    if st.recompute == "full":
        return 2.0 * model.n_layers * _layer_matmul_params(model) + attention
    if st.recompute == "selective":
        return attention
    return 0.0


def _stage_flops_per_microbatch(model: ModelConfig, st: Settings, stage: StagePlan) -> float:
    """Training FLOPs one rank of `stage` spends on one microbatch (with recomputation)."""
    h, s = model.hidden, st.seq_len
    per_token_layer = 6.0 * _layer_matmul_params(model) + 12.0 * h * s
    per_token_layer += _recompute_flops_per_token(model, st) / model.n_layers
    per_token = len(stage.layers) * per_token_layer
    if stage.stage == st.pp - 1:
        per_token += 6.0 * model.vocab_size * h
    return per_token * st.micro_batch_size * s / st.tp


# --- communication ----------------------------------------------------------------------------
def _ring(kind: str, n: float, g: int) -> float:
    """Bytes one rank sends for a collective over `g` ranks on `n` bytes (ring algorithms)."""
    if g <= 1:
        return 0.0
    return (2.0 if kind == "all_reduce" else 1.0) * (g - 1) / g * n


def _tp_bytes_per_microbatch(model: ModelConfig, st: Settings, stage: StagePlan) -> tuple[float, int]:
    """Bytes one tp rank sends for one microbatch on `stage`, and how many collectives."""
    t, e = st.tp, DTYPE_BYTES[st.dtype]
    if t == 1:
        return 0.0, 0
    n = st.micro_batch_size * st.seq_len * model.hidden * e  # a full [b, s, h] activation
    # per layer, forward and backward each: two all-reduces (or an all-gather and a
    # reduce-scatter per all-reduce under sp: the same bytes); full recompute: forward again
    passes = 3 if st.recompute == "full" else 2
    per_layer = passes * 2 * _ring("all_reduce", n, t)
    calls = passes * (4 if st.sp else 2)
    if model.kv_heads % t != 0:  # replicated kv weights: their gradient is summed per microbatch
        replicas = t // model.kv_heads
        per_layer += _ring("all_reduce", 2 * model.head_dim * model.hidden * e, replicas)
        calls += 1
    total = len(stage.layers) * per_layer
    calls *= len(stage.layers)
    if stage.stage == 0:  # embedding: all-reduce (or reduce-scatter, all-gather in backward)
        total += _ring("all_reduce", n, t)
        calls += 2 if st.sp else 1
    if stage.stage == st.pp - 1:  # head input, and the cross-entropy's three [b, s] all-reduces
        total += _ring("all_reduce", n, t) + 3 * _ring("all_reduce", 4 * st.micro_batch_size * st.seq_len, t)
        calls += (2 if st.sp else 1) + 3
    return total, calls


def _comm_bytes(model: ModelConfig, st: Settings, stages: list[StagePlan]) -> dict[str, float]:
    m, e = st.microbatches, DTYPE_BYTES[st.dtype]
    out: dict[str, float] = {}
    out["tp"] = max(_tp_bytes_per_microbatch(model, st, s)[0] for s in stages) * m
    act = st.micro_batch_size * (st.seq_len // st.tp if st.sp else st.seq_len) * model.hidden * e
    out["pp"] = (2 if st.pp > 2 else 1) * m * act if st.pp > 1 else 0.0
    dp = 0.0
    for s in stages:
        grads = s.state.padded_numel * 4
        if st.zero == 0:
            b = _ring("all_reduce", grads, st.dp)
        else:
            b = _ring("reduce_scatter", grads, st.dp) + _ring("all_gather", s.state.padded_numel * e, st.dp)
        dp = max(dp, b)
    out["dp"] = dp
    if model.tie_embeddings and st.pp > 1:
        vocab = padded_vocab_size(model.vocab_size, model.vocab_pad_multiple, st.tp) // st.tp
        out["embedding"] = _ring("all_reduce", vocab * model.hidden * e, 2)
    return out


# --- time -------------------------------------------------------------------------------------
def _bandwidth(device: Device, group_span: int) -> float:
    """Bytes/s of a group whose ranks lie within `group_span` consecutive global ranks."""
    return 1e9 * (device.intra_gbps if group_span <= device.per_node else device.inter_gbps)


def _step_time(
    model: ModelConfig, st: Settings, device: Device, stages: list[StagePlan], comm: dict[str, float]
) -> tuple[float, dict[str, float]]:
    peak = device.peak_tflops(st.dtype) * 1e12 * device.matmul_efficiency
    hbm = device.hbm_gbps * 1e9
    e = DTYPE_BYTES[st.dtype]
    m = st.microbatches
    lat = device.latency_us * 1e-6
    tp_bw = _bandwidth(device, st.tp)
    dp_bw = _bandwidth(device, st.tp * st.dp)
    pp_bw = _bandwidth(device, st.world)
    slot = 0.0
    compute = 0.0
    for s in stages:
        flops = _stage_flops_per_microbatch(model, st, s)
        # weights read in forward and twice in backward, fp32 gradients accumulated, the
        # saved activations written and read back (twice over under full recomputation)
        numel = s.state.numel
        traffic = numel * (3 * e + 8) + s.activations.per_microbatch * (4 if st.recompute == "full" else 2)
        work = max(flops / peak, traffic / hbm)
        tp_b, tp_calls = _tp_bytes_per_microbatch(model, st, s)
        link = tp_b / tp_bw + tp_calls * lat
        if st.pp > 1:
            act = st.micro_batch_size * (st.seq_len // st.tp if st.sp else st.seq_len) * model.hidden * e
            link += 2 * (act / pp_bw + lat)
        if work + link > slot:
            slot, compute = work + link, work
    pipeline = (m + st.pp - 1) * slot if st.schedule in ("1f1b", "gpipe") else m * slot
    dp_time = comm["dp"] / dp_bw + (2 * lat * max(1, len(stages)) if st.dp > 1 else 0.0)
    if st.overlap_grad_reduce:
        dp_time = max(0.0, dp_time - 2.0 / 3.0 * compute)  # hidden behind the last backward
    optimizer = max((s.optimizer_bytes + s.state.grad_bytes) * 2 / hbm for s in stages)
    total = pipeline + dp_time + optimizer
    return total, {"pipeline": pipeline, "bubble": (st.pp - 1) * slot, "dp_exposed": dp_time, "optimizer": optimizer}


# --- search -----------------------------------------------------------------------------------
def layouts(model: ModelConfig, devices: int, fixed: dict[str, int | None]) -> list[tuple[int, int, int]]:
    """(tp, pp, dp) with tp * pp * dp = devices that the model can be split into."""
    out = []
    for tp in range(1, devices + 1):
        if devices % tp or (fixed.get("tp") and tp != fixed["tp"]):
            continue
        try:
            model.check_tp(tp)
        except UserError:
            continue
        for pp in range(1, devices // tp + 1):
            if (devices // tp) % pp or pp > model.n_layers or (fixed.get("pp") and pp != fixed["pp"]):
                continue
            dp = devices // (tp * pp)
            if fixed.get("dp") and dp != fixed["dp"]:
                continue
            out.append((tp, pp, dp))
    return out


def search(
    model: ModelConfig, base: Settings, devices: int, memory_bytes: int, device: Device | str = "H100",
    fixed: dict[str, int | None] | None = None, recompute_fixed: bool = False,
) -> list[Plan]:
    """Every layout of `devices` whose every stage fits `memory_bytes`, fastest first.

    For each (tp, pp, dp), sequence parallelism is on when tp > 1 (it only saves memory
    and moves the same bytes), and, unless `recompute_fixed`, the fastest recomputation
    mode that fits is chosen. Layouts the batch cannot be split over are skipped.
    """
    if not isinstance(devices, int) or devices < 1:
        raise UserError(f"devices must be a whole number >= 1, got {devices!r}")
    device = get_device(device) if isinstance(device, str) else device
    found = []
    for tp, pp, dp in layouts(model, devices, fixed or {}):
        best = None
        modes = [base.recompute] if recompute_fixed else list(RECOMPUTE)
        for mode in modes:
            st = dataclasses.replace(base, tp=tp, pp=pp, dp=dp, recompute=mode, sequence_parallel=tp > 1,
                                     split=base.split if pp == base.pp else None)
            try:
                plan = make_plan(model, st, device)
            except UserError:
                continue
            if plan.fits(memory_bytes) and (best is None or plan.tokens_per_s > best.tokens_per_s):
                best = plan
        if best is not None:
            found.append(best)
    return sorted(found, key=lambda p: -p.tokens_per_s)
