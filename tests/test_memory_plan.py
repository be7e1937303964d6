"""The planner's memory prediction against a measured training step, and the memory metrics.

Each case builds a rank's stage and optimizer as the trainer does (`build_stage`,
`DistributedOptimizer`), runs one real step of `run_pipeline` under an
`ActivationMeter`, and takes the rank's `MemoryReport`; `trident plan`'s arithmetic
(`make_plan`, which builds nothing) must predict every rank's total within 1%, its
activation peak within 1%, and its parameter, gradient and optimizer bytes exactly
(they mirror `DistributedOptimizer.memory()`, bucket padding and ZeRO included). Layouts
(1,1,1), (2,1,1) and (4,1,1) with sequence parallelism, (1,2,1) under 1F1B (where the
first stage, holding two microbatches, must hold the most), GPipe, interleaved (two chunks
per rank) and ZB-H1, (2,2,1) interleaved and ZB-H1 with sequence parallelism, and (1,1,2),
at ZeRO 0, 1 and 2, each recomputation mode, fp32 and bf16, packed documents, small
buckets. ZB-H1's W closures are plain references, not saved tensors: the meter counts
them through `weight_grad.observe`, so its peak is the planner's whole peak.
"""

from __future__ import annotations

import dataclasses

import pytest

MBS, SEQ = 2, 32

# (tp, pp, dp) -> cases run on tp * pp * dp ranks
CASES = {
    (1, 1, 1): [dict(zero=1, recompute="none", m=2), dict(zero=0, recompute="full", m=1, dtype="bf16")],
    (2, 1, 1): [dict(zero=1, recompute="full", m=2, sp=True), dict(zero=0, recompute="none", m=1, packed=True)],
    (4, 1, 1): [dict(zero=1, recompute="selective", m=1, sp=True, dtype="bf16"),
                dict(zero=0, recompute="none", m=1, sp=True, kv=2)],
    (1, 2, 1): [dict(zero=0, recompute="selective", m=3), dict(zero=1, recompute="none", m=4, bucket_mb=0.05),
                dict(zero=0, recompute="full", m=3, schedule="gpipe"),
                dict(zero=1, recompute="none", m=4, schedule="interleaved", vpp=2),
                dict(zero=0, recompute="selective", m=4, schedule="interleaved", vpp=2, dtype="bf16"),
                dict(zero=1, recompute="none", m=3, schedule="zb-h1"),
                dict(zero=0, recompute="full", m=4, schedule="zb-h1", dtype="bf16")],
    (2, 2, 1): [dict(zero=1, recompute="selective", m=4, sp=True, schedule="interleaved", vpp=2),
                dict(zero=1, recompute="none", m=4, sp=True, schedule="zb-h1", packed=True),
                dict(zero=0, recompute="selective", m=4, sp=True, schedule="zb-h1", dtype="bf16")],
    (1, 1, 2): [dict(zero=1, recompute="none", m=2, bucket_mb=0.05), dict(zero=2, recompute="selective", m=1),
                dict(zero=3, recompute="none", m=2), dict(zero=3, recompute="full", m=1, dtype="bf16")],
}


def _model(case: dict | None = None):
    from trident.model.config import preset

    # kv=2 at tp=4: each kv head replicated on two ranks
    return preset("tiny", vocab_size=512, n_layers=4, max_seq_len=SEQ, n_kv_heads=(case or {}).get("kv", 4))


def _settings(layout: tuple[int, int, int], case: dict):
    from trident.planning.plan import Settings

    tp, pp, dp = layout
    return Settings(
        tp=tp, pp=pp, dp=dp, zero=case["zero"], recompute=case["recompute"], micro_batch_size=MBS, seq_len=SEQ,
        global_batch_size=case["m"] * MBS * dp, sequence_parallel=case.get("sp", False),
        dtype=case.get("dtype", "fp32"), bucket_mb=case.get("bucket_mb", 25.0), doc_masking=case.get("packed", False),
        schedule=case.get("schedule", "1f1b"), vpp=case.get("vpp", 1), ep=case.get("ep", 1),
    )


def _topology(layout: list[int], ep: int, made: dict):
    """The rank's Topology at this layout and `ep`, made once."""
    from trident.parallel.topology import Topology

    if ep not in made:
        tp, pp, dp = layout
        made[ep] = Topology.single() if tp * pp * dp == 1 else Topology.from_initialized(tp=tp, pp=pp, ep=ep)
    return made[ep]


def _measure(layout: list[int], cases: list[dict]) -> list[dict]:
    """Every case at one layout on this rank: measured report and the planner's prediction
    (a case's "ep": expert parallelism over that many dp ranks; MoE models also report the
    step's measured all-to-all bytes, `moe_a2a_bytes`, beside the planned ones)."""
    import torch

    from trident.model.moe import moe_step_end
    from trident.model.stage import build_stage
    from trident.parallel.pipeline.executor import run_pipeline
    from trident.parallel.pipeline.p2p import activation_shape
    from trident.parallel.random import RNGStreams
    from trident.parallel.zero.mixed_precision import MixedPrecisionConfig, parse_dtype
    from trident.parallel.zero.optimizer import DistributedOptimizer, OptimizerConfig
    from trident.planning.planner import make_plan
    from trident.training.memory import ActivationMeter, rank_memory

    tp, pp, dp = layout
    topos: dict = {}  # by ep (every rank builds the same groups in the same order)
    out = []
    for case in cases:
        topo = _topology(layout, case.get("ep", 1), topos)
        cfg = _model(case)
        st = _settings((tp, pp, dp), case)
        model = build_stage(cfg, topo, sequence_parallel=st.sequence_parallel, rng=RNGStreams(0, topo),
                            dtype=parse_dtype(st.dtype), recompute=st.recompute, vpp=st.vpp)
        model.init_weights(0)
        model.train()
        opt = DistributedOptimizer(model, topo, OptimizerConfig(zero=st.zero, bucket_mb=st.bucket_mb),
                                   MixedPrecisionConfig(dtype=st.dtype))
        gen = torch.Generator().manual_seed(3)
        rows = st.global_batch_size
        tokens = torch.randint(0, cfg.vocab_size, (rows, SEQ + 1), generator=gen)
        data = {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}
        if st.doc_masking:
            data["doc_ids"] = (torch.rand(rows, SEQ, generator=gen) < 0.1).long().cumsum(1)
        first = topo.dp_rank * case["m"] * MBS
        micros = [{k: v[first + i * MBS : first + (i + 1) * MBS] for k, v in data.items()} for i in range(case["m"])]
        opt.zero_grad()
        with ActivationMeter(model) as meter:  # W closures included (weight_grad.observe)
            run_pipeline(model, topo, micros, act_shape=activation_shape(MBS, SEQ, cfg.hidden, tp, st.sp),
                         loss_divisor=float(rows * SEQ), grad_sync=opt.grad_sync,
                         before_backward=opt.before_backward, schedule=st.schedule, vpp=st.vpp)
        assert meter.live_bytes == 0
        assert opt.step().stepped
        measured = rank_memory(model, opt, meter.peak_bytes, "saved-tensors")
        plan = make_plan(cfg, st, "cpu")
        planned = plan.stages[topo.pp_rank]
        a2a = moe_step_end(model, cfg, topo, update_bias=False).get("moe_a2a_bytes", 0.0)
        out.append({
            "case": case, "rank": topo.rank, "stage": topo.pp_rank,
            "measured": measured.values(),
            "planned": [planned.param_bytes, planned.grad_bytes, planned.optimizer_bytes,
                        planned.activation_bytes, planned.measurable_bytes],
            "a2a": [a2a, plan.comm_bytes.get("ep", 0.0)],
        })
    return out


@pytest.mark.parametrize("layout", list(CASES), ids=lambda lay: "x".join(map(str, lay)))
def test_planner_predicts_each_rank(dist_pool, layout):
    world = layout[0] * layout[1] * layout[2]
    if world == 1:
        results = [_measure(list(layout), CASES[layout])]
    else:
        results = dist_pool.run(world, "test_memory_plan:_measure", timeout=240, layout=list(layout),
                                cases=CASES[layout])
    names = ("params", "grads", "optimizer", "activations", "total")
    for rank_rows in results:
        for row in rank_rows:
            where = f"layout {layout} rank {row['rank']} (stage {row['stage']}) {row['case']}"
            got = dict(zip(names, row["measured"]))
            want = dict(zip(names, row["planned"]))
            for key in ("params", "grads", "optimizer"):
                assert want[key] == got[key], f"{where}: {key} planned {want[key]} vs measured {got[key]}"
            for key in ("activations", "total"):
                err = want[key] / got[key] - 1
                assert abs(err) <= 0.01, f"{where}: {key} planned {want[key]} vs measured {got[key]} ({err:+.1%})"
    if layout[1] > 1:  # under 1F1B the first stage holds the most microbatches, and so the most
        for i, case in enumerate(CASES[layout]):
            if case.get("schedule", "1f1b") != "1f1b":
                continue  # under GPipe every stage holds all m
            by_stage = {rows[i]["stage"]: rows[i] for rows in results}
            assert by_stage[0]["measured"][3] > by_stage[1]["measured"][3], (case, by_stage)
            assert by_stage[0]["planned"][3] > by_stage[1]["planned"][3], (case, by_stage)


def _gather_record(values: list[int]) -> dict:
    import torch.distributed as dist

    from trident.parallel.topology import Topology
    from trident.training.memory import MemoryReport, memory_record

    topo = Topology.from_initialized()
    mine = [v * (dist.get_rank() + 1) for v in values]
    return memory_record(MemoryReport(*mine), topo)


def test_memory_record_carries_every_rank(dist_pool):
    records = dist_pool.run(2, "test_memory_plan:_gather_record", timeout=60, values=[100, 200, 300, 400])
    r0, r1 = records
    assert r0["mem_params_bytes"] == 100 and r1["mem_params_bytes"] == 200  # each rank's own
    assert r0["mem_activation_peak_bytes"] == 400 and r0["mem_total_bytes"] == 1000
    assert r0["mem_max_optim_bytes"] == 600 and r0["mem_max_total_bytes"] == 2000  # the largest rank
    assert r0["mem_rank_total_bytes"] == r1["mem_rank_total_bytes"] == [1000, 2000]
    assert r0["mem_activation_source"] == "saved-tensors"


def test_plan_arithmetic_and_errors():
    from trident.errors import UserError
    from trident.planning.devices import parse_bytes
    from trident.planning.planner import make_plan, search

    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("512 MB") == 512 * 10**6 and parse_bytes("1.5TB") == 1.5e12
    for bad in ("80XB", "GB", "-1GB", "0"):
        with pytest.raises(UserError, match="is not a size; write it like 80GB"):
            parse_bytes(bad)
    cfg = _model()
    base = _settings((1, 1, 1), dict(zero=1, recompute="none", m=4))
    with pytest.raises(UserError, match="model.n_heads=8 is not divisible by tp=3"):
        make_plan(cfg, dataclasses.replace(base, tp=3), "cpu")
    with pytest.raises(UserError, match="pp=8 is more than model.n_layers=4"):
        make_plan(cfg, dataclasses.replace(base, pp=8), "cpu")
    with pytest.raises(UserError, match="global batch size 8 is not a multiple of micro batch size x dp = 2 x 3"):
        make_plan(cfg, dataclasses.replace(base, dp=3), "cpu")
    # recomputation: less memory, more FLOPs, same model FLOPs
    plans = {m: make_plan(cfg, dataclasses.replace(base, recompute=m), "H100") for m in ("none", "selective", "full")}
    acts = [plans[m].stages[0].activation_bytes for m in ("none", "selective", "full")]
    assert acts[0] > acts[1] > acts[2]
    assert plans["none"].model_flops == plans["full"].model_flops < plans["selective"].hardware_flops
    assert plans["selective"].hardware_flops < plans["full"].hardware_flops
    # ZeRO-1 shards the optimizer state over dp; the ring all-reduce sends 2 (dp-1)/dp of the buffer
    z0 = make_plan(cfg, dataclasses.replace(base, dp=2, global_batch_size=8, zero=0), "H100")
    z1 = make_plan(cfg, dataclasses.replace(base, dp=2, global_batch_size=8, zero=1), "H100")
    assert z1.stages[0].optimizer_bytes * 2 == z0.stages[0].optimizer_bytes
    assert z0.comm_bytes["dp"] == z0.stages[0].state.padded_numel * 4
    # the search lists only layouts that fit, fastest first, each a layout of 8 devices
    found = search(cfg, dataclasses.replace(base, global_batch_size=64), 8, 10**9, "H100")
    assert found and all(p.settings.world == 8 and p.fits(10**9) for p in found)
    assert [p.tokens_per_s for p in found] == sorted((p.tokens_per_s for p in found), reverse=True)
    tight = min(p.peak_bytes for p in found)
    assert all(p.peak_bytes <= tight for p in search(cfg, dataclasses.replace(base, global_batch_size=64), 8, tight, "H100"))


def test_schedule_walk_hand_checked():
    """A rank's peak walked along its step list (`plan_pipeline.walk_peak`), against sums
    done by hand; chunk bytes: full A, B-time peak, W-pending, split-B peak."""
    from trident.parallel.pipeline.schedule import schedule_steps
    from trident.planning.plan_pipeline import ChunkBytes, walk_peak

    one = [ChunkBytes(10, 13)]
    # 1F1B, p=4, m=8: rank r holds k = 4 - r, peak (k-1)·A + B-peak; GPipe all 8
    assert [walk_peak(schedule_steps("1f1b", 4, r, 8), one) for r in range(4)] == [43, 33, 23, 13]
    assert walk_peak(schedule_steps("gpipe", 4, 0, 8), one) == 83
    # interleaved p=2, v=2, m=4, rank 0 (chunk 0 carries the embedding: A 10; chunk 1: A 7):
    # F0.0 F1.0 F0.1 F1.1 F2.0 B0.1 F3.0 B1.1 ...; at B1.1 it holds microbatches 0-3 of
    # chunk 0 and 1 of chunk 1: 4·10 + 7, and that B peaks at 4·10 + 9
    two = [ChunkBytes(10, 12), ChunkBytes(7, 9)]
    assert walk_peak(schedule_steps("interleaved", 2, 0, 4, 2), two) == 49
    # ZB-H1, p=3, m=6: the last rank runs F0 B0 F1 B1 (their W deferred), then F2 B2 W0 ...:
    # at B2 it holds two W-pending microbatches (4 each) and the one whose B peaks at 14;
    # rank 0 holds p = 3 whole microbatches, then a split B peaks 1 above 13
    zb = [ChunkBytes(10, 13, pending=4, backward_split=14)]
    assert walk_peak(schedule_steps("zb-h1", 3, 2, 6), zb) == 2 * 4 + 14
    assert walk_peak(schedule_steps("zb-h1", 3, 0, 6), zb) == 2 * 10 + 14


def test_planner_per_schedule():
    """`make_plan` per schedule on small configs: 1F1B's (k-1)·A + peak(one), interleaved's
    chunk-microbatches in flight, ZB-H1's W closures counted exactly as the linears keep them."""
    from trident.model.config import preset
    from trident.parallel.pipeline.schedule import peak_in_flight, schedule_steps
    from trident.planning.plan_memory import Shapes
    from trident.planning.plan_pipeline import chunk_bytes
    from trident.planning.planner import make_plan

    cfg = _model()
    base = _settings((1, 2, 1), dict(zero=1, recompute="none", m=4))
    plans = {name: make_plan(cfg, dataclasses.replace(base, schedule=name, vpp=2 if name == "interleaved" else 1), "cpu")
             for name in ("1f1b", "interleaved", "zb-h1", "gpipe")}
    x = Shapes(cfg, MBS, SEQ, 1, False, "fp32", "cpu", False)
    for s in plans["1f1b"].stages:  # two layers each; k = 2, 1
        c = chunk_bytes(x, range(2), s.stage == 0, s.stage == 1, "none")
        assert s.activations.in_flight == 2 - s.stage and s.activation_bytes == (1 - s.stage) * c.full + c.backward
    # interleaved: rank 0 holds layers 0 and 2; peak 4 microbatches of chunk 0, then chunk 1's B
    s0 = plans["interleaved"].stages[0]
    c0, c1 = chunk_bytes(x, [0], True, False, "none"), chunk_bytes(x, [2], False, False, "none")
    assert s0.layers == [0, 2] and s0.activations.in_flight == 5 and s0.activation_bytes == 4 * c0.full + c1.backward
    assert s0.param_bytes == plans["1f1b"].stages[0].param_bytes  # the same parameters, another placement
    deep = preset("tiny", vocab_size=512, n_layers=24, max_seq_len=SEQ)
    for p, v in ((2, 2), (2, 3), (4, 2), (4, 3)):
        for m in (p * 2, p * 4):
            st = dataclasses.replace(base, pp=p, vpp=v, schedule="interleaved", global_batch_size=m * MBS)
            assert make_plan(deep, st, "cpu").stages[0].activations.in_flight == (p - 1) * 2 + (v - 1) * p + 1
    # ZB-H1: at most p microbatches held, W-pending included; more bytes than 1F1B on later ranks
    assert all(peak_in_flight(schedule_steps("zb-h1", p, r, 3 * p)) <= p for p in (2, 3, 4) for r in range(p))
    zb = plans["zb-h1"]
    assert [s.activation_bytes > o.activation_bytes for s, o in zip(zb.stages[1:], plans["1f1b"].stages[1:])] == [True]
    # per layer (fp32, tp 1; h 64, 8 heads of 8, 4 kv heads, SwiGLU f 128), per token:
    # inputs qkv 64 + proj 64 + fc 64 + proj 256; output gradients qkv 128 + 64 + 256 + 64
    per_layer = 4 * MBS * SEQ * (64 + 64 + 64 + 256 + 128 + 64 + 256 + 64)
    assert all(s.activations.weight_pending == 2 * per_layer for s in zb.stages)
    # with fused attention the closures outweigh what the layer saved (its output gradients
    # are new tensors); with the paper's unfused attention (s x s probabilities) they do not
    full = chunk_bytes(x, range(2), False, False, "none").full
    assert 2 * per_layer > full and zb.stages[1].activation_bytes > plans["1f1b"].stages[1].activation_bytes
    unfused = Shapes(dataclasses.replace(cfg, attention_dropout=0.1), MBS, SEQ, 1, False, "fp32", "cpu", False)
    unfused_chunk = chunk_bytes(unfused, range(2), False, False, "none", split=True)
    assert unfused_chunk.pending < unfused_chunk.full
    # transfers: outputs are freed once sent; at most one batch in flight
    assert plans["1f1b"].stages[0].activations.pipeline_buffer == 2 * 4 * MBS * SEQ * 64
    assert plans["interleaved"].comm_bytes["pp"] == 3 * plans["1f1b"].comm_bytes["pp"]  # (2v - 1) m at p = 2
    b = {n: p.breakdown for n, p in plans.items()}
    assert b["interleaved"]["bubble"] < b["1f1b"]["bubble"] and b["zb-h1"]["bubble"] < b["1f1b"]["bubble"]


def test_plan_command(capsys):
    from cli_helpers import CONFIG

    from trident.tools.cli import main

    assert main(["plan", "--config", str(CONFIG), "--tp", "2", "--pp", "2", "--dp", "2", "--device-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "layout tp=2 pp=2 dp=2 (8 devices)" in out and "FLOPs per step" in out
    assert "tp " in out and "pp " in out and "dp " in out
    assert main(["plan", "--config", str(CONFIG), "--devices", "4", "--device-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "layouts of 4 x H100 that fit 80.00 GB" in out
    assert main(["plan", "--config", str(CONFIG), "--devices", "4", "--device-memory", "lots"]) == 2
    assert "device memory 'lots' is not a size" in capsys.readouterr().err
    assert main(["plan", "--config", str(CONFIG), "--tp", "3"]) == 2
    assert "is not divisible by tp=3" in capsys.readouterr().err
    llama = str(CONFIG.parent / "llama-8b.yaml")
    assert main(["plan", "--config", llama, "--tp", "8", "--pp", "2", "--dp", "4", "--recompute", "selective"]) == 0
    assert "for this layout: stage 0 activations 4.30 GB (trident 3.64)" in capsys.readouterr().out
    assert main(["plan", "--config", str(CONFIG), "--pp", "2", "--schedule", "interleaved", "--vpp", "2"]) == 0
    out = capsys.readouterr().out
    assert "(interleaved, 2 virtual stages per rank)" in out and "schedules at this layout" in out
    assert "    0      0,2         5 " in out and "    1      1,3         3 " in out  # layers and (chunk, mb) held
    for name in ("1f1b", "interleaved", "zb-h1", "gpipe"):
        assert f"{name:>11} " in out
    # a layout the schedule cannot run is one sentence
    assert main(["plan", "--config", str(CONFIG), "--pp", "2", "--schedule", "interleaved", "--vpp", "2",
                 "train.global_batch_size=12"]) == 2
    assert "runs microbatches in groups of pp=2, but there are 3 per step" in capsys.readouterr().err
    assert main(["plan", "--config", str(CONFIG), "--pp", "2", "--vpp", "2"]) == 2
    assert "parallel.vpp=2 needs pp_schedule interleaved" in capsys.readouterr().err


def test_activations_at_or_below_megatrons_formula():
    """llama-8b at 64 devices, every layout with sequence parallelism: every stage's planned
    activation peak is at most Megatron-LM's theoretical figure for the same layout (its
    ``compute_activation_memory``, `trident.planning.megatron`)."""
    from pathlib import Path

    from trident.planning.megatron import megatron_activation_bytes, megatron_layer_bytes
    from trident.planning.planner import layouts, make_plan, settings_from_config
    from trident.training.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "configs" / "llama-8b.yaml")
    # the anchor: 128 MiB per layer per microbatch at tp 8, 4.30 GB for (8, 2, 4)
    assert megatron_layer_bytes(cfg.model, 8192, 1, 8) == 128 * 2**20
    anchor = settings_from_config(cfg, tp=8, pp=2, dp=4, zero=1, recompute="selective", sequence_parallel=True)
    assert round(megatron_activation_bytes(cfg.model, anchor) / 1e9, 2) == 4.30
    checked = 0
    for tp, pp, dp in layouts(cfg.model, 64, {}):
        if tp == 1:
            continue
        st = settings_from_config(cfg, tp=tp, pp=pp, dp=dp, zero=1, recompute="selective", sequence_parallel=True)
        megatron = megatron_activation_bytes(cfg.model, st)
        worst = max(stage.activation_bytes for stage in make_plan(cfg.model, st, "H100").stages)
        assert worst <= megatron, f"(tp, pp, dp)={(tp, pp, dp)}: trident {worst / 1e9:.2f} GB > Megatron {megatron / 1e9:.2f} GB"
        checked += 1
        for vpp in (2, 4):  # with Megatron's interleaved penalty, 1 + (pp - 1) / (pp·vpp)
            inter = dataclasses.replace(st, schedule="interleaved", vpp=vpp)
            if pp == 1 or pp * vpp > cfg.model.n_layers:
                continue
            worst = max(stage.activation_bytes for stage in make_plan(cfg.model, inter, "H100").stages)
            assert worst <= megatron_activation_bytes(cfg.model, inter), f"interleaved {(tp, pp, dp, vpp)}"
            checked += 1
    assert checked == 20 + 26


BENCH = dict(hidden=64, heads=8, kv_heads=4, ffn=160, seq=32, micro_batch=2, dtype="bf16", recompute="selective",
             trace=None, tp=[1, 2])


def _by_kind(tp: int, sp: bool) -> dict:
    from trident.tools.bench_memory import _measure

    return _measure(tp, sp, BENCH)


@pytest.mark.parametrize("tp,sp", [(1, False), (2, True)])
def test_layer_bytes_by_kind_match_measured(dist_pool, tp, sp):
    """`trident bench memory`'s attribution: each kind of one layer's saved tensors, as the
    planner counts it, equals what autograd kept (bf16, selective recomputation); under
    sequence parallelism the layer keeps less than Megatron's 18 + 4f/h units."""
    rows = [_by_kind(tp, sp)] if tp == 1 else dist_pool.run(tp, "test_memory_plan:_by_kind", timeout=120, tp=tp, sp=sp)
    for row in rows:
        assert row["planned"] == row["measured"], row
        assert row["measured"]["linear inputs"] > 0 and row["measured"]["mlp"] > 0
        if sp:
            assert sum(row["measured"].values()) / row["unit"] < row["megatron"]
