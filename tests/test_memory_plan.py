"""The planner's memory prediction against a measured training step, and the memory metrics.

Each case builds a rank's stage and optimizer as the trainer does (`build_stage`,
`DistributedOptimizer`), runs one real step of `run_pipeline` under an
`ActivationMeter`, and takes the rank's `MemoryReport`; `trident plan`'s arithmetic
(`make_plan`, which builds nothing) must predict every rank's total within 1%, its
activation peak within 1%, and its parameter, gradient and optimizer bytes exactly
(they mirror `DistributedOptimizer.memory()`, bucket padding and ZeRO included). Layouts
(1,1,1), (2,1,1) and (4,1,1) with sequence parallelism, (1,2,1) under 1F1B (where the
first stage, holding two microbatches, must hold the most) and GPipe, and (1,1,2), at ZeRO 0, 1 and 2, with each
recomputation mode, fp32 and bf16, packed documents and small buckets.
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
                dict(zero=0, recompute="full", m=3, schedule="gpipe")],
    (1, 1, 2): [dict(zero=1, recompute="none", m=2, bucket_mb=0.05), dict(zero=2, recompute="selective", m=1)],
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
        schedule=case.get("schedule", "1f1b"),
    )


def _measure(layout: list[int], cases: list[dict]) -> list[dict]:
    """Every case at one layout on this rank: measured report and the planner's prediction."""
    import torch

    from trident.model.stage import build_stage
    from trident.parallel.pipeline.executor import run_pipeline
    from trident.parallel.pipeline.p2p import activation_shape
    from trident.parallel.random import RNGStreams
    from trident.parallel.topology import Topology
    from trident.parallel.zero.mixed_precision import MixedPrecisionConfig, parse_dtype
    from trident.parallel.zero.optimizer import DistributedOptimizer, OptimizerConfig
    from trident.planning.planner import make_plan
    from trident.training.memory import ActivationMeter, rank_memory

    tp, pp, dp = layout
    topo = Topology.single() if tp * pp * dp == 1 else Topology.from_initialized(tp=tp, pp=pp)
    out = []
    for case in cases:
        cfg = _model(case)
        st = _settings((tp, pp, dp), case)
        model = build_stage(cfg, topo, sequence_parallel=st.sequence_parallel, rng=RNGStreams(0, topo),
                            dtype=parse_dtype(st.dtype), recompute=st.recompute)
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
        with ActivationMeter(model) as meter:
            run_pipeline(model, topo, micros, act_shape=activation_shape(MBS, SEQ, cfg.hidden, tp, st.sequence_parallel),
                         loss_divisor=float(rows * SEQ), grad_sync=opt.grad_sync, before_backward=opt.before_backward,
                         schedule=st.schedule)
        assert opt.step().stepped
        measured = rank_memory(model, opt, meter.peak_bytes, meter.source)
        planned = make_plan(cfg, st, "cpu").stages[topo.pp_rank]
        out.append({
            "case": case, "rank": topo.rank, "stage": topo.pp_rank,
            "measured": measured.values(),
            "planned": [planned.param_bytes, planned.grad_bytes, planned.optimizer_bytes, planned.activation_bytes,
                        planned.measurable_bytes],
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
    assert checked == 20


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
