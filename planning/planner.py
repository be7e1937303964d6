"""Will it fit, and how fast will it go? A layout's memory, FLOPs, traffic and step time.

The two entry points of `trident plan`:

* `make_plan` predicts one layout from the config alone (no model is built, nothing is
  allocated): per pipeline stage, each rank's parameters, gradients, optimizer state and
  peak activations under the pipeline schedule (`trident.planning.plan_memory`, walked
  along each rank's step list by `trident.planning.plan_pipeline`; checked against
  measured steps by tests/test_memory_plan.py), and the peak total, which counts the
  full fp32 gradient buffer at ZeRO-2 too (it lives through the backward passes of a
  step); then the step's FLOPs, the bytes each rank sends in each group and a roofline
  step time (`trident.planning.plan_cost`) on a declared device (`trident.planning.devices`).
* `search` enumerates every layout of N devices the model allows, keeps those whose
  every stage fits the device memory, and orders them by predicted tokens/s.

The records they return (`Settings`, `StagePlan`, `Plan`) live in `trident.planning.plan`.
"""

from __future__ import annotations

import dataclasses

from trident.errors import UserError
from trident.model.config import ModelConfig
from trident.parallel.pipeline.schedule import SCHEDULES, check_layout
from trident.parallel.pipeline.stages import stage_layers
from trident.planning.devices import Device, get_device
from trident.planning.plan import Plan, Settings, StagePlan
from trident.planning.plan_cost import comm_bytes, recompute_flops_per_token, step_time
from trident.planning.plan_memory import DTYPE_BYTES, Shapes, rank_chunks, stage_params, state_bytes
from trident.planning.plan_pipeline import rank_activation_bytes
from trident.training.config import RECOMPUTE, Config
from trident.training.metrics import flops_per_token


def settings_from_config(cfg: Config, **overrides: object) -> Settings:
    """The config's layout and batch, with `overrides` (None values are ignored)."""
    t, p = cfg.train, cfg.parallel
    values = dict(
        tp=p.tp, pp=p.pp, dp=p.dp or 1, zero=cfg.optim.zero, recompute=t.recompute,
        micro_batch_size=t.micro_batch_size, seq_len=cfg.data.seq_len, global_batch_size=t.global_batch_size,
        sequence_parallel=p.sequence_parallel, dtype=t.dtype, schedule=p.pp_schedule, vpp=p.vpp,
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
    if st.schedule not in SCHEDULES:
        raise UserError(f"unknown pipeline schedule {st.schedule!r}; valid schedules are {', '.join(SCHEDULES)}")
    check_layout(st.schedule, st.pp, st.microbatches, st.vpp)
    if st.pp * st.vpp > model.n_layers and st.vpp > 1:
        raise UserError(
            f"pp={st.pp} x parallel.vpp={st.vpp} = {st.pp * st.vpp} pipeline stages is more than "
            f"model.n_layers={model.n_layers}; every stage needs at least one layer"
        )
    stage_layers(model.n_layers, st.pp * st.vpp, st.split)


def make_plan(model: ModelConfig, st: Settings, device: Device | str = "H100") -> Plan:
    """Memory per stage, FLOPs, communication and predicted step time of one layout."""
    device = get_device(device) if isinstance(device, str) else device
    check(model, st)
    m = st.microbatches
    shapes = Shapes(model, st.micro_batch_size, st.seq_len, st.tp, st.sp, st.dtype, device.kind, st.doc_masking)
    stages = []
    for r in range(st.pp):
        chunks = rank_chunks(model.n_layers, st.pp, r, st.split, st.vpp)
        params = stage_params(model, st.tp, st.pp, r, st.sequence_parallel, st.split, st.vpp)
        state = state_bytes(params, st.dp, st.zero, st.dtype, st.bucket_mb)
        act = rank_activation_bytes(shapes, st.schedule, st.pp, r, m, chunks, st.recompute)
        stages.append(StagePlan(r, tuple(chunks), state, act))
    tokens = st.global_batch_size * st.seq_len
    model_flops = flops_per_token(model, st.seq_len) * tokens
    hardware_flops = model_flops + recompute_flops_per_token(model, st) * tokens
    comm = comm_bytes(model, st, stages)
    time_s, breakdown = step_time(model, st, device, stages, comm)
    return Plan(st, device, stages, model_flops, hardware_flops, comm, time_s, breakdown)


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
    mode that fits is chosen. Layouts the batch cannot be split over, or the schedule cannot
    run (interleaved with fewer layers than pp·vpp, or microbatches not a multiple of pp),
    are skipped; at pp = 1 the schedule is moot and 1F1B is used.
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
            if pp == 1:
                st = dataclasses.replace(st, schedule="1f1b", vpp=1)
            try:
                plan = make_plan(model, st, device)
            except UserError:
                continue
            if plan.fits(memory_bytes) and (best is None or plan.tokens_per_s > best.tokens_per_s):
                best = plan
        if best is not None:
            found.append(best)
    return sorted(found, key=lambda p: -p.tokens_per_s)
