"""`trident bench pipeline`: the real executor and transfers on stages of synthetic compute.

Each of pp local processes (gloo) is one stage whose forward and backward cost a fixed
time: a sleep (exact, so the figures isolate the schedule and the transfers) or a fixed
number of matrix multiplications (real CPU work, timed alone first). The benchmark runs
the pipeline schedule for a few steps and prints the measured step time against the
ideal (m+p-1)(tf+tb), the bubble (p-1)/(m+p-1), and the idle share measured from the
last step's timeline; ``--trace DIR`` also writes that step's Chrome trace and Gantt PNG.

Run it as ``trident bench pipeline ...``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pipeline", help="pipeline schedule: measured step time vs (m+p-1)(tf+tb)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pp", type=int, default=4, help="pipeline stages (one local process each)")
    parser.add_argument("--microbatches", "-m", type=int, default=8, help="microbatches per step")
    parser.add_argument("--schedule", default="1f1b", help="1f1b or gpipe")
    parser.add_argument("--compute", choices=("sleep", "matmul"), default="sleep", help="what a stage's work is")
    parser.add_argument("--tf-ms", type=float, default=10.0, help="forward time per stage and microbatch (sleep)")
    parser.add_argument("--tb-ms", type=float, default=20.0, help="backward time per stage and microbatch (sleep)")
    parser.add_argument("--matmuls", type=int, default=4, help="forward matmuls per microbatch (matmul; backward does 2x)")
    parser.add_argument("--size", type=int, default=256, help="square matrix size of each matmul (matmul)")
    parser.add_argument("--hidden", type=int, default=256, help="width of the activation sent between stages")
    parser.add_argument("--seq", type=int, default=128, help="sequence length of the activation sent between stages")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--trace", metavar="DIR", help="write the last step's Chrome trace and Gantt PNG here")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the arguments, spawn one process per stage, print the figures."""
    import torch.multiprocessing as mp

    from trident.errors import UserError
    from trident.parallel.pipeline.schedule import SCHEDULES

    if args.pp < 1 or args.microbatches < 1 or args.steps < 1 or args.warmup < 0:
        raise UserError(
            f"--pp, --microbatches and --steps must be >= 1 and --warmup >= 0, got "
            f"{args.pp}, {args.microbatches}, {args.steps}, {args.warmup}"
        )
    if args.schedule not in SCHEDULES:
        raise UserError(f"unknown pipeline schedule {args.schedule!r}; valid schedules are {', '.join(SCHEDULES)}")
    with tempfile.TemporaryDirectory(prefix="trident-bench-pp-") as tmp:
        config = vars(args).copy()
        config.pop("func", None)
        mp.start_processes(_stage_main, args=(config, tmp), nprocs=args.pp, start_method="spawn")
        result = json.loads((Path(tmp) / "result.json").read_text())
    print(format_report(result))
    return 0


# --- the synthetic stage ------------------------------------------------------------------------
def _make_stage(config: dict, first: bool, last: bool):
    import torch
    from torch import nn

    class _Work(torch.autograd.Function):
        """y = x * w, with the stage's fixed cost added to the forward and the backward."""

        @staticmethod
        def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x, w)
            stage.cost(config["tf_ms"], 1)
            return x * w

        @staticmethod
        def backward(ctx, grad: torch.Tensor):
            x, w = ctx.saved_tensors
            stage.cost(config["tb_ms"], 2)
            return grad * w, (grad * x).sum(dim=(0, 1))

    class SyntheticStage(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(config["hidden"]))
            gen = torch.Generator().manual_seed(0)
            self.matrix = torch.randn(config["size"], config["size"], generator=gen) / config["size"] ** 0.5

        def cost(self, ms: float, factor: int) -> None:
            if config["compute"] == "sleep":
                time.sleep(ms / 1e3)
                return
            x = self.matrix
            for _ in range(config["matmuls"] * factor):
                x = x @ self.matrix

        def forward(self, x: torch.Tensor, labels=None, doc_ids=None) -> torch.Tensor:
            # x: tokens [b, s] on the first stage, else hidden [b, s, hidden]
            if first:
                x = torch.zeros(*x.shape, config["hidden"])  # [b, s, hidden]
            y = _Work.apply(x, self.weight)  # [b, s, hidden]
            return y.mean(-1) if last else y  # per-token "loss" [b, s] on the last stage

    stage = SyntheticStage()
    return stage


def _stage_main(rank: int, config: dict, tmp: str) -> None:
    """One stage: join the group, time the stage alone (matmul), run and time the steps."""
    import torch
    import torch.distributed as dist

    from trident.parallel.pipeline.executor import run_pipeline
    from trident.parallel.pipeline.p2p import activation_shape
    from trident.parallel.pipeline.timeline import Timeline, gather_events
    from trident.parallel.topology import Topology

    torch.set_num_threads(1)
    pp, m = config["pp"], config["microbatches"]
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=pp)
    try:
        topo = Topology.from_initialized(pp=pp)
        stage = _make_stage(config, topo.is_first_stage, topo.is_last_stage)
        tf, tb = config["tf_ms"] / 1e3, config["tb_ms"] / 1e3
        if config["compute"] == "matmul":  # the stage's cost, timed alone (median of 5)
            tf = statistics.median(_timed(lambda: stage.cost(0, 1)) for _ in range(5))
            tb = statistics.median(_timed(lambda: stage.cost(0, 2)) for _ in range(5))
            costs = torch.tensor([tf, tb], dtype=torch.float64)
            dist.all_reduce(costs, op=dist.ReduceOp.MAX)  # the slowest stage sets the pace
            tf, tb = costs.tolist()
        b, s = 1, config["seq"]
        micro = [{"tokens": torch.zeros(b, s, dtype=torch.long), "labels": torch.zeros(b, s, dtype=torch.long)}] * m
        shape = activation_shape(b, s, config["hidden"])
        times = []
        timeline = None
        for step in range(config["warmup"] + config["steps"]):
            last = step == config["warmup"] + config["steps"] - 1
            timeline = Timeline(topo.pp_rank, topo.rank) if last else None
            stage.zero_grad(set_to_none=True)
            dist.barrier()
            start = time.perf_counter()
            run_pipeline(stage, topo, micro, act_shape=shape, loss_divisor=float(m * b * s),
                         schedule=config["schedule"], timeline=timeline, reduce_loss_over_dp=False)
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step ends when its last stage does
            if step >= config["warmup"]:
                times.append(elapsed.item())
        events = gather_events(timeline)
        if rank == 0:
            _write_result(config, tf, tb, times, events, Path(tmp) / "result.json")
    finally:
        dist.destroy_process_group()


def _write_result(config: dict, tf: float, tb: float, times: list[float], events: list, path: Path) -> None:
    """Rank 0: the figures and the last step's timeline summary (and trace files) as JSON."""
    from trident.parallel.pipeline.timeline import idle_fraction, plot_gantt, write_chrome_trace

    mean = {cat: statistics.fmean(e.duration for e in events if e.cat == cat) for cat in ("forward", "backward")}
    result = {**config, "tf": tf, "tb": tb, "times": times, "idle": idle_fraction(events),
              "tf_seen": mean["forward"], "tb_seen": mean["backward"], "span": max(e.end for e in events)}
    if config["trace"]:
        out = Path(config["trace"])
        result["files"] = [str(write_chrome_trace(events, out / "pipeline_trace.json"))]
        try:
            result["files"].append(str(plot_gantt(events, out / "pipeline_gantt.png")))
        except Exception as err:  # matplotlib is optional: report, keep the JSON trace
            result["files"].append(f"(no PNG: {err})")
    path.write_text(json.dumps(result))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- the report -------------------------------------------------------------------------------------
def format_report(r: dict) -> str:
    from trident.parallel.pipeline.schedule import bubble_fraction, ideal_time

    p, m, tf, tb = r["pp"], r["microbatches"], r["tf"], r["tb"]
    ideal = ideal_time(p, m, tf, tb)
    median = statistics.median(r["times"])
    what = "sleep" if r["compute"] == "sleep" else f"{r['matmuls']}x{r['size']}^2 matmuls, timed alone"
    lines = [
        f"pipeline bench: pp={p} m={m} schedule={r['schedule']} compute={what} "
        f"(tf={tf * 1e3:.2f} ms, tb={tb * 1e3:.2f} ms per stage and microbatch; "
        f"activation 1x{r['seq']}x{r['hidden']} fp32), {r['steps']} steps after {r['warmup']} warm-up",
        f"  measured step time      {median:.4f} s  (median; min {min(r['times']):.4f}, max {max(r['times']):.4f})",
        f"  ideal (m+p-1)(tf+tb)    {ideal:.4f} s  -> measured/ideal {median / ideal:.3f}",
        f"  compute as recorded     tf={r['tf_seen'] * 1e3:.2f} ms, tb={r['tb_seen'] * 1e3:.2f} ms (timeline means) "
        f"-> ideal {ideal_time(p, m, r['tf_seen'], r['tb_seen']):.4f} s vs {r['span']:.4f} s on that timeline",
        f"  bubble (p-1)/(m+p-1)    {bubble_fraction(p, m):.1%}",
        f"  measured idle share     {r['idle']:.1%}  (last step's timeline: time outside forward/backward)",
    ]
    for path in r.get("files", []):
        lines.append(f"  wrote {path}")
    return "\n".join(lines)

