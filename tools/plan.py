"""`trident plan --config FILE [--tp --cp --pp --dp --zero --recompute --micro-batch-size --seq-len]
[--schedule 1f1b|interleaved|zb-h1|gpipe] [--vpp V] [--device H100] [--device-memory 80GB]
[--devices N] [section.key=value ...]`

Predicts, without building the model, each pipeline stage's memory per rank (parameters,
gradients, optimizer state, peak activations under the pipeline schedule, walked along
each rank's step list), the step's FLOPs, the bytes each rank sends per step in its tp,
pp, dp and cp groups, and a step time from the device's declared peaks. With pp > 1 it also
compares the schedules at the same layout: activation peak, bubble and step time. With
`--devices N` it lists every layout of N devices that fits the device memory, best
predicted throughput first (fixing any of --tp/--cp/--pp/--dp/--recompute given; context
parallelism is tried from seq_len 8192 on, or when nothing fits without it).

`--cp N` (context parallelism, ring attention) gives each rank seq_len/cp tokens of every
sample: activations fall by cp, the ring's K/V (and in backward dK/dV) blocks in flight
join the buffers, and gradients and ZeRO's shards spread over dp·cp.

`--ep N` (expert parallelism, default parallel.ep; kept as given by --devices) gives each
rank E/ep experts of every MoE layer, their gradients and ZeRO shards over dp/ep ranks,
and the tokens' all-to-all (uniform routing) in the traffic and the step time.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="predict memory per rank, FLOPs, communication and speed of a layout (or find layouts that fit)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None, help="YAML config (see configs/); defaults apply when omitted")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: parallel.tp)")
    p.add_argument("--cp", type=int, default=None, help="context-parallel size (default: parallel.cp); seq_len must "
                   "be a multiple of 2*cp")
    p.add_argument("--pp", type=int, default=None, help="pipeline-parallel size (default: parallel.pp)")
    p.add_argument("--dp", type=int, default=None, help="data-parallel size (default: parallel.dp, else 1)")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel size, dividing dp and model.moe_experts "
                   "(default: parallel.ep)")
    p.add_argument("--zero", type=int, default=None, help="ZeRO stage 0, 1, 2 or 3 (default: optim.zero)")
    p.add_argument("--recompute", default=None, help="none | selective | full (default: train.recompute)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="default: train.micro_batch_size")
    p.add_argument("--seq-len", type=int, default=None, help="default: data.seq_len")
    p.add_argument("--schedule", default=None, help="pipeline schedule: 1f1b | interleaved | zb-h1 | gpipe "
                   "(default: parallel.pp_schedule)")
    p.add_argument("--vpp", type=int, default=None, help="virtual stages per pipeline rank, for the interleaved "
                   "schedule (default: parallel.vpp)")
    p.add_argument("--device", default="H100", help="declared device figures to use: H100, H200, A100, cpu")
    p.add_argument("--device-memory", default=None, help="memory of one device, e.g. 80GB or 80GiB (default: the device's)")
    p.add_argument("--devices", type=int, default=None, help="list the layouts of this many devices that fit")
    p.add_argument("--top", type=int, default=20, help="with --devices: show at most this many layouts")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.dtype=bf16")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trident.planning.devices import get_device, parse_bytes
    from trident.planning.planner import make_plan, search, settings_from_config
    from trident.training.config import load_config

    cfg = load_config(args.config, list(args.overrides))
    device = get_device(args.device)
    memory = parse_bytes(args.device_memory) if args.device_memory is not None else device.memory_bytes
    base = settings_from_config(
        cfg, tp=args.tp, cp=args.cp, pp=args.pp, dp=args.dp, ep=args.ep, zero=args.zero, recompute=args.recompute,
        micro_batch_size=args.micro_batch_size, seq_len=args.seq_len, schedule=args.schedule, vpp=args.vpp,
    )
    if args.devices is None:
        plan = make_plan(cfg.model, base, device)
        print(format_plan(plan, memory, args.config, cfg.model))
        return 0
    fixed = {"tp": args.tp, "cp": args.cp, "pp": args.pp, "dp": args.dp}
    plans = search(cfg.model, base, args.devices, memory, device, fixed, recompute_fixed=args.recompute is not None)
    print(format_search(plans, args.devices, memory, device.name, args.top))
    return 0 if plans else 1


def _unit(largest: float) -> tuple[str, float]:
    """The unit a table of byte counts reads best in: GB, MB or kB."""
    for name, size in (("GB", 1e9), ("MB", 1e6)):
        if largest >= size:
            return name, size
    return "kB", 1e3


def _layers(chunks) -> str:
    """A rank's layers, one range per chunk: ``0-3`` or ``0-1,8-9``."""
    return ",".join(f"{c.start}-{c.stop - 1}" if len(c) > 1 else str(c.start) for c in chunks)


def format_plan(plan, memory: int, source: str | None = None, model=None) -> str:
    """The per-stage memory table, FLOPs, bytes per group and the predicted step; with the
    `model` config, Megatron's activation figure and (pp > 1) the schedules compared too."""
    from trident.planning.devices import format_bytes

    st, dev = plan.settings, plan.device
    m = st.microbatches
    schedule = st.schedule + (f", {st.vpp} virtual stages per rank" if st.vpp > 1 else "")
    lines = [
        f"trident plan: {source or 'default config'}, {st.dtype}, on {dev.name} ({format_bytes(memory)} each)",
        f"layout tp={st.tp}{f' cp={st.cp}' if st.cp > 1 else ''} pp={st.pp} dp={st.dp}"
        f"{f' ep={st.ep}' if st.ep > 1 else ''} ({st.world} devices)"
        f"{', sequence parallel' if st.sp else ''}, ZeRO-{st.zero}, recompute {st.recompute}",
        f"batch {st.global_batch_size} x {st.seq_len} tokens: {m} microbatches of {st.micro_batch_size} per pipeline "
        f"({schedule})",
    ]
    unit, size = _unit(plan.peak_bytes)
    width = max(8, *(len(_layers(s.chunks)) for s in plan.stages))
    lines += [
        "",
        f"memory per rank ({unit}; in-flight: (chunk, microbatch) pairs held at once)",
        f"{'stage':>5} {'layers':>{width}} {'in-flight':>9} {'params':>8} {'grads':>8} {'optim':>8} "
        f"{'activ.':>8} {'buffers':>8} {'peak':>8}  fits",
    ]
    for s in plan.stages:
        cells = (s.param_bytes, s.state.grad_peak_bytes, s.optimizer_bytes, s.activation_bytes,
                 s.buffer_bytes, s.peak_bytes)
        lines.append(
            f"{s.stage:>5} {_layers(s.chunks):>{width}} {s.activations.in_flight:>9} "
            + " ".join(f"{n / size:>8.2f}" for n in cells)
            + f"  {'yes' if s.peak_bytes <= memory else 'NO'}"
        )
    lines += _notes(plan, model, unit, size)
    if model is not None and st.pp > 1:
        lines += ["", *format_schedules(plan, model, memory)]
    world = st.world
    lines += [
        "",
        f"FLOPs per step: {plan.model_flops:.3e} model, {plan.hardware_flops:.3e} with recomputation "
        f"({plan.hardware_flops / world:.3e} per device)",
        "bytes sent per device per step: "
        + ", ".join(f"{_group(group, st)} {format_bytes(n)}" for group, n in plan.comm_bytes.items()),
        f"predicted step {plan.step_time_s:.3f} s (pipeline {plan.breakdown['pipeline']:.3f} s of which bubble "
        f"{plan.breakdown['bubble']:.3f} s, dp exposed {plan.breakdown['dp_exposed']:.3f} s, optimizer "
        f"{plan.breakdown['optimizer']:.3f} s): {plan.tokens_per_s:,.0f} tokens/s, MFU {100 * plan.mfu:.1f}% "
        f"at {dev.peak_tflops(st.dtype):g} TFLOP/s {st.dtype} per device",
    ]
    if st.ep > 1:
        lines.append(f"expert all-to-all (ep={st.ep}, uniform routing): {format_bytes(plan.comm_bytes['ep'])} sent per "
                     f"device per step, {1e3 * plan.breakdown['all_to_all']:.2f} ms of the pipeline, exposed "
                     f"({'NVLink' if st.tp * st.ep <= dev.per_node else 'network'})")
    if st.cp > 1:
        ring, exposed = plan.breakdown["ring"], plan.breakdown["ring_exposed"]
        lines.append(f"ring attention (cp={st.cp}): {ring:.3f} s of transfers per step, {exposed:.3f} s exposed "
                     f"({100 * (1 - exposed / ring) if ring else 100:.0f}% hidden behind attention)")
    return "\n".join(lines)


def _group(name: str, st) -> str:
    """A traffic group's label: the gradient reduction spans dp·cp under context parallelism."""
    if name == "dp":
        return "dp·cp" if st.cp > 1 else ("dp (experts over dp/ep)" if st.ep > 1 else "dp")
    return {"cp": "cp ring", "ep": "ep all-to-all"}.get(name, name)


def _notes(plan, model, unit: str, size: float) -> list[str]:
    """The lines under the memory table: what ZeRO-2, cp and ZB-H1 change in it, and
    Megatron-LM's figure where its formula applies."""
    st = plan.settings
    notes: list[str] = []
    if st.zero == 2:
        notes.append(f"(grads: the full fp32 buffer held during backward; between steps only the "
                     f"1/{'dp' if st.cp == 1 else 'dp·cp'} shard)")
    if st.zero == 3:
        s = plan.stages[0]
        held = ("every unit gathered from its first use to the step's end" if not st.zero3_reshard_after_forward
                else "the largest unit gathered, the next one's gather in flight")
        notes.append(f"(ZeRO-3: params, grads and optimizer state are 1/{st.dp_cp} shards; during a step "
                     f"{held}: +{(s.state.param_peak_bytes - s.param_bytes) / size:.2f} {unit} on stage 0)")
    if st.cp > 1:
        notes.append(_cp_note(plan, unit, size))
    if st.ep > 1 and model is not None:
        notes.append(_ep_note(plan, model))
    if any(s.activations.weight_pending for s in plan.stages):
        s = plan.stages[0]
        notes.append(
            f"({st.schedule}: one microbatch between its B and its W keeps {s.activations.weight_pending / size:.2f} "
            f"{unit} on stage 0 (the linears' inputs and output gradients), a whole one "
            f"{s.activations.per_microbatch / size:.2f})"
        )
    # what Megatron prices (its formula has no cp term: shown for cp = 1 only)
    if model is not None and st.sp and st.recompute == "selective" and st.dtype != "fp32" and st.cp == 1:
        from trident.planning.megatron import megatron_activation_bytes

        megatron = megatron_activation_bytes(model, st)
        notes.append(f"Megatron-LM's formula (theoretical_memory_usage.py) for this layout: stage 0 activations "
                     f"{megatron / size:.2f} {unit} (trident {plan.stages[0].activation_bytes / size:.2f})")
    return notes


def _cp_note(plan, unit: str, size: float) -> str:
    """What context parallelism changes in the table: tokens per rank, the ring's buffers."""
    st, s = plan.settings, plan.stages[0]
    share = (f"; ZeRO-{st.zero} shards over dp·cp = {st.dp_cp}" if st.zero else "")
    return (f"(cp={st.cp}: each rank holds {st.local_seq} of {st.seq_len} tokens per sample in 2 load-balanced "
            f"chunks; buffers include the ring's K/V + fp32 dK/dV blocks in flight, "
            f"{s.activations.ring_buffer / size:.2f} {unit}{share})")


def _ep_note(plan, model) -> str:
    """What expert parallelism changes in the table: experts per rank, their shards, the
    activation assumption."""
    st = plan.settings
    e = model.moe_experts
    share = f", ZeRO-{st.zero} shards" if st.zero else ""
    return (f"(ep={st.ep}: each rank holds {e // st.ep} of {e} experts per MoE layer, their gradients{share} "
            f"over dp/ep = {st.edp} ranks; expert activations assume uniform routing, T·k rows per rank, "
            f"a rank's own varying with its routing)")


def format_schedules(plan, model, memory: int) -> list[str]:
    """Every schedule at `plan`'s layout (interleaved at its vpp, else 2): the worst rank's
    activation peak and peak total, rank 0's (chunk, microbatch) pairs, bubble and step."""
    import dataclasses

    from trident.errors import UserError
    from trident.parallel.pipeline.schedule import SCHEDULES
    from trident.planning.planner import make_plan

    st = plan.settings
    unit, size = _unit(plan.peak_bytes)
    lines = [
        f"schedules at this layout (worst rank, {unit})",
        f"{'schedule':>11} {'vpp':>3} {'in-flight':>9} {'activ.':>8} {'peak':>8} {'bubble':>7} {'step s':>8}  fits",
    ]
    for name in SCHEDULES:
        vpp = (st.vpp if st.vpp > 1 else 2) if name == "interleaved" else 1
        try:
            other = make_plan(model, dataclasses.replace(st, schedule=name, vpp=vpp), plan.device)
        except UserError as e:
            lines.append(f"{name:>11} {vpp:>3}  cannot run: {e}")
            continue
        b = other.breakdown
        lines.append(
            f"{name:>11} {vpp:>3} {other.stages[0].activations.in_flight:>9} "
            f"{max(s.activation_bytes for s in other.stages) / size:>8.2f} {other.peak_bytes / size:>8.2f} "
            f"{100 * b['bubble'] / b['pipeline']:>6.1f}% {other.step_time_s:>8.3f}  "
            f"{'yes' if other.fits(memory) else 'NO'}"
        )
    return lines


def format_search(plans, devices: int, memory: int, device: str, top: int) -> str:
    """Layouts that fit, best predicted throughput first."""
    from trident.planning.devices import format_bytes

    if not plans:
        return (f"no layout of {devices} x {device} fits {format_bytes(memory)} per device; try more devices, "
                f"a smaller micro batch, recompute=full or ZeRO-1/2")
    unit, size = _unit(max(p.peak_bytes for p in plans))
    ep = plans[0].settings.ep
    kept = f"; ep={ep} as given, dp a multiple of it" if ep > 1 else ""
    lines = [
        f"layouts of {devices} x {device} that fit {format_bytes(memory)} per device, fastest first "
        f"(showing {min(top, len(plans))} of {len(plans)}{kept})",
        f"{'tp':>3} {'cp':>3} {'pp':>3} {'dp':>3} {'sp':>3} {'zero':>4} {'recompute':>9} {'peak ' + unit:>8} {'tokens/s':>12} "
        f"{'MFU':>6} {'step s':>8}",
    ]
    for p in plans[:top]:
        st = p.settings
        lines.append(
            f"{st.tp:>3} {st.cp:>3} {st.pp:>3} {st.dp:>3} {'on' if st.sp else '-':>3} {st.zero:>4} {st.recompute:>9} "
            f"{p.peak_bytes / size:>8.2f} {p.tokens_per_s:>12,.0f} {100 * p.mfu:>5.1f}% {p.step_time_s:>8.3f}"
        )
    return "\n".join(lines)
