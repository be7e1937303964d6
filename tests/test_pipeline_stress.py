"""A long 1F1B step on pp=4 with random stalls on one stage, recorded on the timeline.

256 microbatches through four stages while stage 2 sleeps a random 0-2 ms before each
forward and each backward: the step must finish (no deadlock, within the harness
timeout), keep the in-flight bound, still equal the single-process step, and leave a
Chrome trace (and a PNG, when matplotlib is installed) that shows every compute step.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from trident.parallel.pipeline.schedule import one_f_one_b

MICROBATCHES = 256
SEQ = 8


def _config():
    from trident.model.config import preset

    return preset("tiny", n_layers=4, hidden=32, n_heads=4, n_kv_heads=4, ffn_hidden=64, max_seq_len=SEQ)


def _stress(out_dir: str) -> dict:
    import random
    import time

    import torch
    import torch.distributed as dist

    from equivalence import gather_checked, rel_err
    from trident.model.gpt import GPT
    from trident.parallel.pipeline.p2p import activation_shape
    from trident.parallel.tensor.sharding import global_shapes
    from trident.parallel.topology import Topology
    from trident.model.stage import build_stage
    from trident.parallel.pipeline.executor import run_pipeline
    from trident.parallel.pipeline.timeline import Timeline, gather_events, plot_gantt, write_chrome_trace

    topo = Topology.from_initialized(pp=4)
    cfg = _config()
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, cfg.vocab_size, (MICROBATCHES, SEQ + 1), generator=gen)
    micro = [{"tokens": tokens[i : i + 1, :-1], "labels": tokens[i : i + 1, 1:]} for i in range(MICROBATCHES)]

    model = build_stage(cfg, topo)
    model.init_weights(0)
    stall = None
    if topo.pp_rank == 2:
        rng = random.Random(topo.rank)
        forward = model.forward

        def slow_forward(*args, **kwargs):
            time.sleep(rng.uniform(0, 0.002))
            return forward(*args, **kwargs)

        model.forward = slow_forward  # the instance attribute shadows the method

        def stall(mb: int, last: bool) -> None:
            time.sleep(rng.uniform(0, 0.002))

    timeline = Timeline(topo.pp_rank, topo.rank)
    res = run_pipeline(
        model, topo, micro, act_shape=activation_shape(1, SEQ, cfg.hidden), loss_divisor=MICROBATCHES * SEQ,
        before_backward=stall, timeline=timeline,
    )
    assert res.peak_in_flight == 4 - topo.pp_rank, res
    assert res.sends == res.recvs == MICROBATCHES * (2 if 0 < topo.pp_rank < 3 else 1)
    events = gather_events(timeline)

    ref_model = GPT(cfg, Topology.single())
    grads = gather_checked(model, dist.group.WORLD, grads=True, names=global_shapes(ref_model))
    out = {"loss": res.loss}
    if topo.rank == 0:
        ref_model.init_weights(0)
        loss = ref_model(tokens[:, :-1], labels=tokens[:, 1:]).mean()
        loss.backward()
        ref_grads = gather_checked(ref_model, None, grads=True)
        out["ref_loss"] = loss.item()
        out["worst_grad_err"] = max(rel_err(g, ref_grads[n]) for n, g in grads.items())
        write_chrome_trace(events, Path(out_dir) / "trace.json")
        if importlib.util.find_spec("matplotlib") is not None:
            plot_gantt(events, Path(out_dir) / "gantt.png")
    return out


def test_many_microbatches_with_stalls_finish_and_trace(dist_pool, tmp_path):
    results = dist_pool.run(4, "test_pipeline_stress:_stress", timeout=300, out_dir=str(tmp_path))
    ref = results[0]["ref_loss"]
    assert all(abs(r["loss"] / ref - 1) <= 1e-5 for r in results), [r["loss"] for r in results]
    assert results[0]["worst_grad_err"] <= 1e-5

    trace = json.loads((tmp_path / "trace.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    for stage in range(4):
        for cat in ("forward", "backward"):
            mbs = sorted(e["args"]["microbatch"] for e in spans if e["pid"] == stage and e["cat"] == cat)
            assert mbs == list(range(MICROBATCHES)), (stage, cat)
    # each stage ran its own 1F1B list, one compute step at a time, in that order
    for stage in range(4):
        mine = sorted((e for e in spans if e["pid"] == stage and e["cat"] in ("forward", "backward")),
                      key=lambda e: e["ts"])
        assert [e["name"] for e in mine] == [str(s) for s in one_f_one_b(4, stage, MICROBATCHES)], stage
        for a, b in zip(mine, mine[1:]):
            assert b["ts"] >= a["ts"] + a["dur"] - 1e-3, (stage, a["name"], b["name"])  # 1 ns for float rounding
    # on one shared time axis, microbatch i reaches stage r+1 only after stage r is done
    # with it (slack for the clock alignment, which is as good as a barrier's exit)
    fwd = {(e["pid"], e["args"]["microbatch"]): e for e in spans if e["cat"] == "forward"}
    for (stage, mb), e in fwd.items():
        if stage > 0:
            before = fwd[(stage - 1, mb)]
            assert e["ts"] >= before["ts"] + before["dur"] - 50_000, (stage, mb)
    if importlib.util.find_spec("matplotlib") is None:
        return  # the PNG is an optional extra
    assert (tmp_path / "gantt.png").read_bytes()[:4] == b"\x89PNG"


SCHEDULE_MICROBATCHES = 128


def _stress_schedules() -> dict:
    """Every other schedule, 128 microbatches, random stalls on stage 2: finishes, keeps its
    bound and equals the single-process loss."""
    import random
    import time

    import torch

    from trident.model.gpt import GPT
    from trident.model.stage import build_stage
    from trident.parallel.pipeline.executor import run_pipeline
    from trident.parallel.pipeline.p2p import activation_shape
    from trident.parallel.pipeline.schedule import in_flight_limit
    from trident.parallel.topology import Topology

    topo = Topology.from_initialized(pp=4)
    m = SCHEDULE_MICROBATCHES
    cfg = _config().__class__(**{**_config().__dict__, "n_layers": 8})
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, cfg.vocab_size, (m, SEQ + 1), generator=gen)
    micro = [{"tokens": tokens[i : i + 1, :-1], "labels": tokens[i : i + 1, 1:]} for i in range(m)]
    ref_model = GPT(cfg, Topology.single())
    ref_model.init_weights(0)
    with torch.no_grad():
        ref = ref_model(tokens[:, :-1], labels=tokens[:, 1:]).mean().item()
    losses = {}
    for schedule, vpp in (("interleaved", 2), ("zb-h1", 1), ("gpipe", 1)):
        model = build_stage(cfg, topo, vpp=vpp)
        model.init_weights(0)
        stall = None
        if topo.pp_rank == 2:
            rng = random.Random(topo.rank)
            forward = model.forward

            def slow_forward(*args, forward=forward, rng=rng, **kwargs):
                time.sleep(rng.uniform(0, 0.002))
                return forward(*args, **kwargs)

            model.forward = slow_forward

            def stall(mb: int, last: bool, rng=rng) -> None:
                time.sleep(rng.uniform(0, 0.002))

        res = run_pipeline(model, topo, micro, act_shape=activation_shape(1, SEQ, cfg.hidden), loss_divisor=m * SEQ,
                           schedule=schedule, vpp=vpp, before_backward=stall)
        assert res.peak_in_flight == in_flight_limit(schedule, 4, topo.pp_rank, m, vpp), (schedule, res)
        losses[schedule] = res.loss
    return {"ref": ref, "losses": losses}


def test_every_schedule_survives_stalls(dist_pool):
    results = dist_pool.run(4, "test_pipeline_stress:_stress_schedules", timeout=300)
    for r in results:
        for schedule, loss in r["losses"].items():
            assert abs(loss / r["ref"] - 1) <= 1e-5, (schedule, loss, r["ref"])
