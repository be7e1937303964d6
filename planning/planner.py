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
  every stage fits the device memory, and orders them by predicted tokens/s; context
  parallelism joins the candidates for long sequences (`search` says when).

Context parallelism (`Settings.cp`): world = tp·cp·pp·dp; each rank holds seq_len/cp
tokens of every sample, so activations fall by cp and the ring's blocks in flight are
added; gradients are reduced, and ZeRO shards, over dp·cp; the batch arithmetic (m =
global / (micro · dp)) does not change, cp ranks sharing their samples.

Expert parallelism (`Settings.ep`, from ``parallel.ep``; the search keeps it as given):
ep divides dp and adds no ranks; each rank holds E/ep experts of every MoE layer, whose
gradients are reduced, and ZeRO-sharded, over dp/ep ranks; its experts compute as many
rows as without ep under uniform routing, and the tokens' all-to-all joins the traffic
and the step time (`trident.planning.plan_cost`).

The records they return (`Settings`, `StagePlan`, `Plan`) live in `trident.planning.plan`.
"""

from __future__ import annotations

import dataclasses

from trident.errors import UserError
from trident.model.config import ModelConfig
from trident.parallel.context.sharding import check_cp
from trident.parallel.pipeline.schedule import SCHEDULES, check_layout
from trident.parallel.pipeline.stages import stage_layers
from trident.parallel.topology import resolve_layout
from trident.planning.devices import Device, get_device
from trident.planning.plan import Plan, Settings, StagePlan
from trident.planning.plan_cost import comm_bytes, recompute_flops_per_token, step_time
from trident.planning.plan_memory import DTYPE_BYTES, Shapes
from trident.planning.plan_pipeline import rank_activation_bytes
from trident.planning.plan_state import rank_chunks, stage_params, state_bytes
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
        zero3_reshard_after_forward=cfg.optim.zero3_reshard_after_forward,
        cp=p.cp, ep=p.ep,
    )
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)  # type: ignore[arg-type]


def check(model: ModelConfig, st: Settings) -> None:
    """The layout checks training makes, as one sentence each, before any arithmetic."""
    for name in ("tp", "cp", "pp", "dp", "ep", "micro_batch_size", "seq_len", "global_batch_size"):
        value = getattr(st, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{name} must be a whole number >= 1, got {value!r}")
    if st.zero not in (0, 1, 2, 3):
        raise UserError(f"zero is {st.zero!r}; valid values are 0, 1, 2, 3")
    if st.recompute not in RECOMPUTE:
        raise UserError(f"recompute is {st.recompute!r}; valid values are {', '.join(RECOMPUTE)}")
    if st.dtype not in DTYPE_BYTES:
        raise UserError(f"dtype is {st.dtype!r}; valid values are {', '.join(DTYPE_BYTES)}")
    model.check_tp(st.tp, st.ep)
    if st.ep != 1:
        resolve_layout(st.world, st.tp, st.pp, st.dp, st.cp, st.ep)  # ep divides dp, and no cp with it
    if st.seq_len > model.max_seq_len:
        raise UserError(f"seq_len={st.seq_len} exceeds model.max_seq_len={model.max_seq_len}")
    per_step = st.micro_batch_size * st.dp
    if st.global_batch_size % per_step != 0:
        raise UserError(
            f"global batch size {st.global_batch_size} is not a multiple of micro batch size x dp = "
            f"{st.micro_batch_size} x {st.dp} = {per_step}"
        )
    check_cp(st.seq_len, st.cp)
    if st.cp > 1 and model.attention_dropout > 0:
        raise UserError(f"model.attention_dropout={model.attention_dropout} cannot be used with cp={st.cp}: ring "
                        f"attention has no attention dropout; set model.attention_dropout=0 or cp=1")
    if st.sp and st.local_seq % st.tp != 0:
        where = f"seq_len={st.seq_len}" if st.cp == 1 else f"seq_len/cp = {st.seq_len}/{st.cp} = {st.local_seq}"
        raise UserError(f"{where} is not divisible by tp={st.tp} (sequence parallelism)")
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
    shapes = Shapes(model, st.micro_batch_size, st.seq_len, st.tp, st.sp, st.dtype, device.kind, st.doc_masking,
                    st.cp, st.ep)
    stages = []
    for r in range(st.pp):
        chunks = rank_chunks(model.n_layers, st.pp, r, st.split, st.vpp)
        params = stage_params(model, st.tp, st.pp, r, st.sequence_parallel, st.split, st.vpp, st.ep)
        # reduced and sharded over dp·cp; expert parameters (ep > 1) over dp/ep
        state = state_bytes(params, st.dp_cp, st.zero, st.dtype, st.bucket_mb, st.zero3_reshard_after_forward,
                            st.edp)
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
    """(tp, pp, dp) with tp * pp * dp = devices that the model can be split into (the
    search passes devices / cp)."""
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


LONG_SEQ = 8192  # from this sequence length on, the search tries context parallelism as well


def cp_sizes(seq_len: int, devices: int, fixed: dict[str, int | None]) -> list[int]:
    """The cp sizes a search may use: `fixed["cp"]` when given, else 1 and every divisor of
    `devices` that cuts `seq_len` into 2·cp equal chunks (the load-balanced split)."""
    cp = fixed.get("cp")
    if cp:
        if devices % cp or (cp > 1 and seq_len % (2 * cp)):
            raise UserError(f"cp={cp} must divide devices={devices} and cut seq_len={seq_len} into 2*cp equal "
                            f"chunks; valid cp sizes here are "
                            f"{', '.join(map(str, cp_sizes(seq_len, devices, {})))}")
        return [cp]
    return [c for c in range(1, devices + 1) if devices % c == 0 and (c == 1 or seq_len % (2 * c) == 0)]


def _best_layouts(
    model: ModelConfig, base: Settings, cp: int, devices: int, memory_bytes: int, device: Device,
    fixed: dict[str, int | None], recompute_fixed: bool,
) -> list[Plan]:
    """For each (tp, pp, dp) of devices/cp at this `cp`, its fastest plan that fits."""
    found = []
    for tp, pp, dp in layouts(model, devices // cp, fixed):
        best = None
        modes = [base.recompute] if recompute_fixed else list(RECOMPUTE)
        for mode in modes:
            st = dataclasses.replace(base, tp=tp, cp=cp, pp=pp, dp=dp, recompute=mode, sequence_parallel=tp > 1,
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
    return found


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

    Context parallelism (`cp_sizes`: divisors of `devices` with seq_len % 2·cp == 0) is
    tried when `fixed["cp"]` asks for a size, when seq_len >= `LONG_SEQ` (8192: there
    activations, which cp divides, outgrow the weights, which it does not), or, at shorter
    sequences, only when no cp = 1 layout fits. Below that it would only add ring traffic
    to a layout that already fits, and double the list to read.
    """
    if not isinstance(devices, int) or devices < 1:
        raise UserError(f"devices must be a whole number >= 1, got {devices!r}")
    device = get_device(device) if isinstance(device, str) else device
    fixed = fixed or {}
    sizes = cp_sizes(base.seq_len, devices, fixed)
    found: list[Plan] = []
    if fixed.get("cp") or base.seq_len >= LONG_SEQ:
        for cp in sizes:
            found += _best_layouts(model, base, cp, devices, memory_bytes, device, fixed, recompute_fixed)
    else:
        found = _best_layouts(model, base, 1, devices, memory_bytes, device, fixed, recompute_fixed)
        for cp in sizes[1:] if not found else []:
            found += _best_layouts(model, base, cp, devices, memory_bytes, device, fixed, recompute_fixed)
    return sorted(found, key=lambda p: -p.tokens_per_s)
