"""The ranks of `trident bench pipeline`: a synthetic stage of fixed cost, run and timed.

`bench_rank` runs inside an initialised process group (the benchmark's own spawned
processes, or the test harness's workers): for each planned (schedule, m, vpp) it runs
the real executor for a few steps on `SyntheticStage` and rank 0 returns the figures and
the last step's timeline (and writes the trace files).

The stage costs a fixed time per microbatch: forward tf, backward tb, split under a
zero-bubble schedule into B = tb - tw (the input's gradient) and a W of tw that the stage
hands to `trident.parallel.tensor.weight_grad.defer`, so the executor runs it in the W
step, exactly as the tensor-parallel linears do. With v chunks per rank each chunk costs
1/v of the rank's tf, tb and tw.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from trident.parallel.tensor.weight_grad import defer


class SyntheticStage(nn.Module):
    """Rank `rank`'s chunks of a pipeline of p ranks x vpp chunks: y = x * w per chunk
    (chunk c is virtual stage c*p + rank), the first virtual stage taking token ids and
    the last returning a per-token "loss" [b, s]."""

    def __init__(self, config: dict, rank: int, vpp: int) -> None:
        super().__init__()
        self.config, self.rank, self.vpp, self.p = config, rank, vpp, config["pp"]
        self.weights = nn.ParameterList(nn.Parameter(torch.ones(config["hidden"])) for _ in range(vpp))
        gen = torch.Generator().manual_seed(0)
        self.matrix = torch.randn(config["size"], config["size"], generator=gen) / config["size"] ** 0.5

    def cost(self, part: str) -> None:
        """Spend one chunk's share of the rank's time for `part`: F, B (input only), W or BW."""
        c, v = self.config, self.vpp
        if c["compute"] == "sleep":
            ms = {"F": c["tf_ms"], "B": c["tb_ms"] - c["tw_ms"], "W": c["tw_ms"], "BW": c["tb_ms"]}[part]
            time.sleep(ms / v / 1e3)
            return
        units = max(1, round(c["matmuls"] / v)) * (2 if part == "BW" else 1)  # B and W: half a backward each
        x = self.matrix
        for _ in range(units):
            x = x @ self.matrix

    def forward(self, x: torch.Tensor, labels=None, doc_ids=None, chunk: int = 0) -> torch.Tensor:
        virtual = chunk * self.p + self.rank
        if virtual == 0:  # x: tokens [b, s]
            x = torch.zeros(*x.shape, self.config["hidden"])  # [b, s, hidden]
        y = _Work.apply(x, self.weights[chunk], self)  # [b, s, hidden]
        return y.mean(-1) if virtual == self.p * self.vpp - 1 else y  # per-token "loss" [b, s] at the end


class _Work(torch.autograd.Function):
    """y = x * w at the stage's fixed cost; its backward defers the weight's gradient (W)
    when a zero-bubble schedule's B is running, as the tensor-parallel linears do."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, stage: SyntheticStage) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.stage = stage
        stage.cost("F")
        return x * w

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        stage = ctx.stage

        def weight_grad() -> torch.Tensor:
            stage.cost("W")
            return (grad * x).sum(dim=(0, 1))

        if defer(w, weight_grad):
            stage.cost("B")
            return grad * w, None, None
        stage.cost("BW")
        return grad * w, (grad * x).sum(dim=(0, 1)), None


def stage_main(rank: int, config: dict, tmp: str) -> None:
    """One spawned process of the benchmark: join the group, run, rank 0 writes the result."""
    import datetime

    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=config["pp"],
                            timeout=datetime.timedelta(seconds=config["timeout_s"]))
    try:
        result = bench_rank(config)
        if rank == 0:
            (Path(tmp) / "result.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def bench_rank(config: dict) -> dict | None:
    """Every planned run on this rank; rank 0 returns the figures, the others None."""
    from trident.parallel.topology import Topology

    torch.set_num_threads(1)
    topo = Topology.from_initialized(pp=config["pp"], timeout_s=config["timeout_s"])
    runs, timelines = [], []
    for name, m, vpp in config["runs"]:
        run, events = _run(config, topo, name, m, vpp)
        runs.append(run)
        timelines.append(events)
    if topo.rank != 0:
        return None
    result = {**config, "results": runs}
    if config["trace"]:
        _write_traces(config, runs, timelines)
        (Path(config["trace"]) / "pipeline_bench.json").write_text(json.dumps(result, indent=1))
    return result


def _run(config: dict, topo, name: str, m: int, vpp: int) -> tuple[dict, list]:
    """Warm-up and timed steps of one schedule; its costs and the last step's timeline."""
    from trident.parallel.pipeline.executor import run_pipeline
    from trident.parallel.pipeline.p2p import activation_shape
    from trident.parallel.pipeline.timeline import Timeline, gather_events, idle_fraction

    stage = SyntheticStage(config, topo.pp_rank, vpp)
    tf, tb, tw = config["tf_ms"] / 1e3, config["tb_ms"] / 1e3, config["tw_ms"] / 1e3
    if config["compute"] == "matmul":  # a chunk's costs timed alone (median of 5), times v chunks
        tf, tb, tw = (vpp * statistics.median(_timed(stage.cost, part) for _ in range(5)) for part in ("F", "BW", "W"))
        costs = torch.tensor([tf, tb, tw], dtype=torch.float64)
        dist.all_reduce(costs, op=dist.ReduceOp.MAX)  # the slowest stage sets the pace
        tf, tb, tw = costs.tolist()
    b, s = 1, config["seq"]
    micro = [{"tokens": torch.zeros(b, s, dtype=torch.long), "labels": torch.zeros(b, s, dtype=torch.long)}] * m
    shape = activation_shape(b, s, config["hidden"])
    times, timeline = [], None
    for step in range(config["warmup"] + config["steps"]):
        timeline = Timeline(topo.pp_rank, topo.rank) if step == config["warmup"] + config["steps"] - 1 else None
        stage.zero_grad(set_to_none=True)
        dist.barrier()
        start = time.perf_counter()
        run_pipeline(stage, topo, micro, act_shape=shape, loss_divisor=float(m * b * s), schedule=name, vpp=vpp,
                     timeline=timeline, reduce_loss_over_dp=False)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step ends when its last stage does
        if step >= config["warmup"]:
            times.append(elapsed.item())
    events = gather_events(timeline)
    seen = {cat: statistics.fmean([e.duration for e in events if e.cat == cat] or [0.0])
            for cat in ("forward", "backward", "weight")}  # per chunk step, as recorded
    run = {"schedule": name, "m": m, "vpp": vpp, "tf": tf, "tb": tb, "tw": tw, "times": times,
           "idle": idle_fraction(events), "span": max(e.end for e in events), "seen": seen}
    return run, events


def _write_traces(config: dict, runs: list[dict], timelines: list[list]) -> None:
    """Per run a Chrome trace and Gantt PNG; per m one PNG of the schedules side by side."""
    import functools

    from trident.parallel.pipeline.schedule import bubble_fraction
    from trident.parallel.pipeline.timeline import plot_gantt, plot_gantts, summarize, write_chrome_trace

    out = Path(config["trace"])
    for run, events in zip(runs, timelines):
        stem = out / f"pipeline_{run['schedule']}_m{run['m']}"
        bubble = functools.partial(bubble_fraction, name=run["schedule"], vpp=run["vpp"])
        summary = summarize(events, config["warmup"] + config["steps"], bubble, run["schedule"])
        run["files"] = [str(write_chrome_trace(events, stem.with_suffix(".json"), summary))]
        try:
            run["files"].append(str(plot_gantt(events, stem.with_suffix(".png"), summary=summary)))
        except Exception as err:  # matplotlib is optional: report, keep the JSON trace
            run["files"].append(f"(no PNG: {err})")
    for m in dict.fromkeys(run["m"] for run in runs):
        panels = [(_panel_title(config, run), events) for run, events in zip(runs, timelines) if run["m"] == m]
        try:
            runs[-1].setdefault("files", []).append(str(plot_gantts(panels, out / f"pipeline_schedules_m{m}.png")))
        except Exception as err:
            runs[-1].setdefault("files", []).append(f"(no PNG: {err})")


def _panel_title(config: dict, run: dict) -> str:
    v = f", v={run['vpp']}" if run["vpp"] > 1 else ""
    return (f"{run['schedule']} (p={config['pp']}{v}, m={run['m']}): step {run['span'] * 1e3:.0f} ms as recorded, "
            f"idle {run['idle']:.1%}")


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start
