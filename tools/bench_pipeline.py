"""`trident bench pipeline`: the pipeline schedules, measured against their own formulas.

Each of pp local processes (gloo) is one stage whose forward and backward cost a fixed
time (`tools.bench_pipeline_stage`): a sleep (exact, so the figures isolate the schedule
and the transfers) or a fixed number of matrix multiplications (real CPU work, timed
alone first). Under zb-h1 the backward is split: B costs tb - tw, and the W of tw is
deferred the way the tensor-parallel linears defer it. With interleaved virtual stages
each of a rank's v chunks costs 1/v of its tf, tb.

For each schedule (side by side with ``--schedule all``) and each m it runs a few steps
of the real executor and prints the measured step time next to the schedule's ideal
step with free transfers (1F1B, GPipe (m+p-1)(tf+tb); interleaved (m·v+p-1)(tf+tb)/v;
ZB-H1 m(tf+tb) + (p-1)(tf+tB-tW)), the bubble of that ideal step and the idle share
measured on the last step's timeline. ``--trace DIR`` writes that step's Chrome trace
and Gantt PNG per schedule, and one PNG of the schedules side by side per m.

The default costs (40 ms forward, 80 ms backward per rank) are large next to what a
step costs beyond its compute on a CPU box with gloo (about 0.3-0.5 ms per compute step
and 1 ms per exchange, shown in the last column): with 10/20 ms those overheads alone
put every schedule 8-30% above its ideal, interleaved (twice the steps and exchanges
per unit of compute at v=2) the most.

Run it as ``trident bench pipeline ...``, e.g. ``trident bench pipeline -m 8 16``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pipeline", help="pipeline schedules: measured step time vs each schedule's ideal",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pp", type=int, default=4, help="pipeline stages (one local process each)")
    parser.add_argument("--microbatches", "-m", type=int, nargs="+", default=[8],
                        help="microbatches per step; several values give one table each (e.g. -m 8 16)")
    parser.add_argument("--schedule", default="all", help="1f1b, interleaved, zb-h1, gpipe, or all (side by side)")
    parser.add_argument("--vpp", type=int, default=None, help="virtual stages per rank of interleaved (default 2)")
    parser.add_argument("--compute", choices=("sleep", "matmul"), default="sleep", help="what a stage's work is")
    parser.add_argument("--tf-ms", type=float, default=40.0, help="forward time per stage and microbatch (sleep)")
    parser.add_argument("--tb-ms", type=float, default=80.0, help="backward time per stage and microbatch (sleep)")
    parser.add_argument("--tw-ms", type=float, default=None,
                        help="the weight-gradient part W of the backward under zb-h1 (sleep; default tb/2)")
    parser.add_argument("--matmuls", type=int, default=4, help="forward matmuls per microbatch (matmul; backward does 2x)")
    parser.add_argument("--size", type=int, default=256, help="square matrix size of each matmul (matmul)")
    parser.add_argument("--hidden", type=int, default=256, help="width of the activation sent between stages")
    parser.add_argument("--seq", type=int, default=128, help="sequence length of the activation sent between stages")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--trace", metavar="DIR", help="write each schedule's last step as Chrome trace and Gantt PNG")
    parser.set_defaults(func=run)


def plan_runs(args: argparse.Namespace) -> tuple[list[list], list[str]]:
    """The (schedule, m, vpp) runs the arguments ask for, and a note per run left out.

    Every check is made here, before a process starts, and fails as one sentence naming
    the numbers. With ``--schedule all`` and no ``--vpp``, a schedule that cannot run a
    layout (interleaved with pp = 1 or m not a multiple of pp) is left out with a note.
    """
    from trident.errors import UserError
    from trident.parallel.pipeline.schedule import SCHEDULES, check_layout

    ms = args.microbatches
    if args.pp < 1 or min(ms) < 1 or args.steps < 1 or args.warmup < 0:
        raise UserError(
            f"--pp, --microbatches and --steps must be >= 1 and --warmup >= 0, got "
            f"{args.pp}, {' '.join(map(str, ms))}, {args.steps}, {args.warmup}"
        )
    if args.schedule != "all" and args.schedule not in SCHEDULES:
        raise UserError(f"unknown pipeline schedule {args.schedule!r}; valid: {', '.join(SCHEDULES)} or all")
    if args.tf_ms < 0 or args.tb_ms < 0:
        raise UserError(f"--tf-ms and --tb-ms must be >= 0, got {args.tf_ms} and {args.tb_ms}")
    if args.tw_ms is not None and not 0 <= args.tw_ms <= args.tb_ms:
        raise UserError(f"--tw-ms is the W part of the backward: between 0 and --tb-ms={args.tb_ms}, got {args.tw_ms}")
    names = list(SCHEDULES) if args.schedule == "all" else [args.schedule]
    runs, notes = [], []
    for m in ms:
        for name in names:
            if name == "interleaved":
                vpp = 2 if args.vpp is None else args.vpp
            else:  # --vpp is interleaved's under "all"; asked of another schedule, it gets its error
                vpp = 1 if args.vpp is None or args.schedule == "all" else args.vpp
            try:
                check_layout(name, args.pp, m, vpp)
            except UserError as err:
                if args.schedule != "all" or args.vpp is not None:  # asked for by name or by --vpp
                    raise
                notes.append(f"{name} left out at m={m}: {err}")
                continue
            runs.append([name, m, vpp])
    return runs, notes


def make_config(args: argparse.Namespace) -> dict:
    """The checked arguments and the planned runs: what every rank (`bench_rank`) reads."""
    runs, notes = plan_runs(args)
    config = {k: v for k, v in vars(args).items() if k not in ("func", "argv")}
    config.update(runs=runs, notes=notes, timeout_s=300.0, tw_ms=args.tb_ms / 2 if args.tw_ms is None else args.tw_ms)
    return config


def run(args: argparse.Namespace) -> int:
    """Check the arguments, spawn one process per stage, print the figures."""
    import torch.multiprocessing as mp

    from trident.tools.bench_pipeline_stage import stage_main

    config = make_config(args)
    with tempfile.TemporaryDirectory(prefix="trident-bench-pp-") as tmp:
        mp.start_processes(stage_main, args=(config, tmp), nprocs=args.pp, start_method="spawn")
        result = json.loads((Path(tmp) / "result.json").read_text())
    print(format_report(result))
    return 0


# --- the report -------------------------------------------------------------------------------------
_HEADER = (f"  {'schedule':<18} {'measured':>9} {'ideal':>9} {'meas/ideal':>10} {'bubble':>7} {'idle':>7}"
           "   recorded per chunk step; per exchange")


def format_report(r: dict) -> str:
    """The schedules side by side, one table per m, from `bench_rank`'s result."""
    p = r["pp"]
    first = r["results"][0]
    what = "sleep" if r["compute"] == "sleep" else f"{r['matmuls']}x{r['size']}^2 matmuls, timed alone"
    lines = [
        f"pipeline bench: pp={p}, compute={what} (per rank and microbatch tf={first['tf'] * 1e3:.2f} ms, "
        f"tb={first['tb'] * 1e3:.2f} ms, of it W={first['tw'] * 1e3:.2f} ms under zb-h1"
        f"{'' if r['compute'] == 'sleep' else ', as timed in the first run'}; activation "
        f"1x{r['seq']}x{r['hidden']} fp32); median of {r['steps']} steps after {r['warmup']} warm-up",
        "  measured: wall time of a step (slowest rank); ideal: the schedule's step with free transfers;",
        "  bubble: idle share of that ideal step; idle: share of rank-time outside F/B/W on the last step's timeline;",
        "  per exchange: the transfer time with which the simulator, given the recorded compute, takes that step's"
        " time",
    ]
    for m in dict.fromkeys(run["m"] for run in r["results"]):
        lines += ["", f"  m={m}", _HEADER]
        lines += [_row(p, run) for run in r["results"] if run["m"] == m]
        lines += [f"  ({note})" for note in r["notes"] if f"at m={m}:" in note]
        for extra in _comparisons(r["results"], m):
            lines.append(f"  {extra}")
    for run in r["results"]:
        lines += [f"  wrote {path}" for path in run.get("files", [])]
    return "\n".join(lines)


def ideal(p: int, run: dict) -> tuple[float, str]:
    """The schedule's step time with free transfers and the run's own costs, and a mark:
    the formula's value, or the simulator's where the formula does not hold (zb-h1 with
    m < p: the pipeline never fills)."""
    from trident.parallel.pipeline.schedule import SPLIT_BACKWARD, ideal_time
    from trident.parallel.pipeline.simulate import simulate_schedule

    name, m, v = run["schedule"], run["m"], run["vpp"]
    tw = run["tw"] if name in SPLIT_BACKWARD else None
    formula = ideal_time(p, m, run["tf"], run["tb"], name, v, t_weight=tw)
    simulated = simulate_schedule(name, p, m, run["tf"], run["tb"], vpp=v, t_weight=tw).total
    return (formula, "") if abs(simulated - formula) <= 1e-9 * formula else (simulated, "*")


def exchange_latency(p: int, run: dict) -> float:
    """The time per exchange (a batch of transfers) with which the simulator, given the
    compute times the timeline recorded, takes as long as the recorded step: what the
    transfers cost on the critical path. Similar values across schedules say the executor
    adds nothing but its transfers; interleaved has v times as many on its critical path."""
    from trident.parallel.pipeline.schedule import SPLIT_BACKWARD
    from trident.parallel.pipeline.simulate import simulate_schedule

    name, m, v, seen = run["schedule"], run["m"], run["vpp"], run["seen"]
    tf, tb = seen["forward"] * v, (seen["backward"] + seen["weight"]) * v
    tw = seen["weight"] * v if name in SPLIT_BACKWARD else None
    lo, hi = 0.0, run["span"] / 2
    for _ in range(30):  # bisection: the simulated step grows with the transfer time
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if simulate_schedule(name, p, m, tf, tb, mid, v, tw).total < run["span"] else (lo, mid)
    return lo


def _row(p: int, run: dict) -> str:
    step, (best, mark) = statistics.median(run["times"]), ideal(p, run)
    bubble = 1.0 - run["m"] * (run["tf"] + run["tb"]) / best if best > 0 else 0.0
    seen = run["seen"]
    label = run["schedule"] + (f" (v={run['vpp']})" if run["vpp"] > 1 else "")
    recorded = f"F {seen['forward'] * 1e3:.2f}, B {seen['backward'] * 1e3:.2f}" + (
        f", W {seen['weight'] * 1e3:.2f}" if seen["weight"] else "")
    ratio = f"{step / best:.3f}" if best > 0 else "-"
    return (f"  {label:<18} {step:>7.4f} s {best:>7.4f} s{mark or ' '}{ratio:>9} {bubble:>7.1%} {run['idle']:>7.1%}"
            f"   {recorded} ms; {exchange_latency(p, run) * 1e3:.2f} ms")


def _comparisons(results: list[dict], m: int) -> list[str]:
    """ZB-H1's and interleaved's idle share against 1F1B's, measured on the same run."""
    idle = {run["schedule"]: run["idle"] for run in results if run["m"] == m}
    base = idle.get("1f1b")
    if not base:
        return []
    return [f"{name} idle share / 1f1b's: {idle[name] / base:.2f}" for name in ("zb-h1", "interleaved") if name in idle]
