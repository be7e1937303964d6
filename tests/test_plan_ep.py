"""`trident plan` under expert parallelism (`parallel.ep`): each rank's planned parameter,
gradient and optimizer bytes equal the built ones exactly (E/ep experts per MoE layer, the
expert buckets cut apart and padded and ZeRO-sharded over the dp/ep ranks holding them),
at ep 2 of dp 2 (one rank per expert half) and of dp 4 (pairs sharding them), ep 4, with
sequence-parallel tp, pipeline stages and dense blocks mixed in; the activation peak is
planned for uniform routing, so it equals the ep group's mean (its ranks' received rows
sum to their sent ones) and each rank's within its routing's imbalance; the all-to-all
bytes are the formula's, and the measured `moe_a2a_bytes` near them.

Reuses `test_plan_moe._measure_moe` (one real step per case, then `make_plan`).
"""

from __future__ import annotations

import dataclasses

import pytest

# (tp, pp, dp) -> cases, each with its ep; m = 1 keeps one microbatch's routing per peak
CASES = {
    (1, 1, 2): [dict(ep=2, zero=1, recompute="none", m=1), dict(ep=2, zero=0, recompute="selective", m=1, shared=1),
                dict(ep=2, zero=2, recompute="full", m=2, bucket_mb=0.05)],
    (1, 1, 4): [dict(ep=2, zero=1, recompute="none", m=1, bucket_mb=0.05),
                dict(ep=2, zero=2, recompute="selective", m=1, dtype="bf16", shared=1),
                dict(ep=4, zero=1, recompute="none", m=1, layers=3, freq=2),
                dict(ep=2, zero=3, recompute="none", m=1, shared=1)],
    (2, 1, 2): [dict(ep=2, zero=1, recompute="none", m=1, sp=True, shared=1)],
    (1, 2, 2): [dict(ep=2, zero=1, recompute="none", m=2, layers=4, freq=2),
                dict(ep=2, zero=0, recompute="none", m=2, schedule="zb-h1", layers=4, shared=1)],
}


def _twin(case: dict) -> dict:
    """The same case at ep = 1: its activations measured against its plan give the
    planner's error without expert parallelism."""
    return {**case, "ep": 1}


@pytest.mark.parametrize("layout", list(CASES), ids=lambda lay: "x".join(map(str, lay)))
def test_plan_at_ep_matches_each_rank(dist_pool, layout):
    world = layout[0] * layout[1] * layout[2]
    cases = CASES[layout]
    twins = [_twin(c) for c in cases if c["m"] == 1]
    results = dist_pool.run(world, "test_plan_moe:_measure_moe", timeout=300, layout=list(layout),
                            cases=cases + twins)
    names = ("params", "grads", "optimizer", "activations", "total")
    for i, case in enumerate(cases):
        rows = [rank_rows[i] for rank_rows in results]
        for row in rows:
            where = f"layout {layout} rank {row['rank']} {case}"
            got, want = dict(zip(names, row["measured"])), dict(zip(names, row["planned"]))
            for key in ("params", "grads", "optimizer"):
                assert want[key] == got[key], f"{where}: {key} planned {want[key]} vs measured {got[key]}"
            # one rank's experts compute the rows routed to them: uniform routing's count, give or take
            err = want["activations"] / got["activations"] - 1
            assert abs(err) <= 0.05, f"{where}: activations planned {want['activations']} vs {got['activations']}"
        for stage in {row["stage"] for row in rows}:  # the ranks of a stage: whole ep groups
            mine = [row for row in rows if row["stage"] == stage]
            measured = sum(row["measured"][3] for row in mine)
            planned = len(mine) * mine[0]["planned"][3]
            if case["m"] == 1:  # one microbatch: the group's rows are its sent rows, so the mean is exact
                twin = [rank_rows[len(cases) + twins.index(_twin(case))] for rank_rows in results]
                off_at_ep1 = sum(row["measured"][3] - row["planned"][3] for row in twin if row["stage"] == stage)
                # (ZeRO-3: autograd also saves the freed expert units' one-element placeholders,
                # 4 bytes each, which the meter counts; the rest is exact)
                slack = 64 if case["zero"] == 3 else 0
                assert abs(measured - planned - off_at_ep1) <= slack, (layout, case, stage, measured - planned,
                                                                       off_at_ep1)
            else:  # each rank's peak is its busier microbatch's: above the mean of them, a little
                assert -0.02 <= planned / measured - 1 <= 0.002, (layout, case, stage, planned, measured)
        if case["recompute"] != "full":  # (the metric counts a rerun forward's all-to-all once; the plan twice)
            measured, planned = rows[0]["a2a"]
            assert planned > 0 and abs(measured / planned - 1) <= 0.1, (layout, case, measured, planned)


def test_ep_state_and_traffic_by_hand():
    """E/ep experts per layer, their buckets over dp/ep, the all-to-all formula, and the
    dense blocks of a mixed model priced as dense."""
    from test_plan_moe import MOE

    from trident.model.config import preset
    from trident.planning.plan import Settings
    from trident.planning.plan_memory import Shapes, layer_bytes
    from trident.planning.plan_state import stage_params
    from trident.planning.planner import make_plan

    cfg = preset("tiny", vocab_size=512, n_layers=2, max_seq_len=32, **MOE)  # E 4, k 2, h 64, f 32
    names = {p.name: (p.numel, p.expert) for p in stage_params(cfg, tp=1, pp=1, stage=0, ep=2)}
    assert names["layers.1.mlp.experts.gate_up"] == (2 * 2 * 32 * 64, True)
    assert names["layers.1.mlp.router.weight"] == (4 * 64, False)
    base = Settings(tp=1, pp=1, dp=4, zero=1, recompute="none", micro_batch_size=2, seq_len=32, global_batch_size=8,
                    sequence_parallel=False, dtype="bf16", ep=1)
    one, two = (make_plan(cfg, dataclasses.replace(base, ep=ep), "H100") for ep in (1, 2))
    experts = 2 * 2 * 3 * 32 * 64  # per rank: 2 layers x 2 experts x (gate, up, down)
    assert one.stages[0].state.numel - two.stages[0].state.numel == experts
    assert two.stages[0].state.expert_padded_numel == experts  # a multiple of (dp/ep) x 16 already
    assert two.stages[0].optimizer_bytes == 12 * (two.stages[0].state.padded_numel - experts) // 4 + 12 * experts // 2
    # all-to-all: T = 64 tokens x k 2, half remote, 64 x 2 bytes each, dispatch + combine, fwd + bwd, 2 layers
    assert "ep" not in one.comm_bytes and two.comm_bytes["ep"] == 2 * (64 * 2 // 2) * 64 * 2 * 2 * 2
    full = make_plan(cfg, dataclasses.replace(base, ep=2, recompute="full"), "H100")
    assert full.comm_bytes["ep"] == 1.5 * two.comm_bytes["ep"]  # the rerun forward dispatches again
    assert two.breakdown["all_to_all"] > 0 == one.breakdown["all_to_all"]
    assert two.step_time_s > one.step_time_s - one.breakdown["dp_exposed"] + two.breakdown["dp_exposed"] - 1e-12
    # every other block dense: priced as the dense model's block, not as an MoE one
    mixed = dataclasses.replace(cfg, moe_layer_freq=2)
    dense = preset("tiny", vocab_size=512, n_layers=2, max_seq_len=32)
    x = Shapes(mixed, 2, 32, 1, False, "fp32", "cuda", True)
    assert layer_bytes(x, moe=False) == layer_bytes(dataclasses.replace(x, cfg=dense))
    assert sum(layer_bytes(x, moe=True).values()) > sum(layer_bytes(x, moe=False).values())
    mixed_plan = make_plan(mixed, dataclasses.replace(base, dtype="fp32"), "H100")
    all_moe = make_plan(cfg, dataclasses.replace(base, dtype="fp32"), "H100")
    dense_plan = make_plan(dense, dataclasses.replace(base, dtype="fp32"), "H100")
    gap = all_moe.stages[0].activations.per_microbatch - dense_plan.stages[0].activations.per_microbatch
    assert mixed_plan.stages[0].activations.per_microbatch == dense_plan.stages[0].activations.per_microbatch + gap // 2


def test_ep_layouts_that_cannot_run_are_one_sentence():
    from test_plan_moe import MOE

    from trident.errors import UserError
    from trident.model.config import preset
    from trident.planning.plan import Settings
    from trident.planning.planner import make_plan

    cfg = preset("tiny", vocab_size=512, n_layers=2, max_seq_len=32, **MOE)
    st = Settings(tp=1, pp=1, dp=4, zero=1, recompute="none", micro_batch_size=2, seq_len=32, global_batch_size=8,
                  sequence_parallel=False, dtype="bf16", ep=2)
    with pytest.raises(UserError, match="ep=4 does not divide dp=2"):
        make_plan(cfg, dataclasses.replace(st, ep=4, dp=2), "cpu")
    with pytest.raises(UserError, match="needs model.moe_experts divisible by ep"):
        make_plan(cfg, dataclasses.replace(st, ep=8, dp=8, global_batch_size=16), "cpu")


def test_plan_command_at_ep(capsys):
    from cli_helpers import CONFIG

    from trident.tools.cli import main

    moe = ["model.moe_experts=8", "model.moe_top_k=2", "model.moe_ffn_hidden=192", "train.global_batch_size=16"]
    assert main(["plan", "--config", str(CONFIG), "--dp", "4", "--ep", "2", *moe]) == 0
    out = capsys.readouterr().out
    assert "layout tp=1 pp=1 dp=4 ep=2 (4 devices)" in out
    assert "each rank holds 4 of 8 experts per MoE layer, their gradients, ZeRO-1 shards over dp/ep = 2 ranks" in out
    assert "dp (experts over dp/ep) " in out and "ep all-to-all " in out and "exposed (NVLink)" in out
    assert main(["plan", "--config", str(CONFIG), "--devices", "8", "--ep", "4", *moe]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[2:]]
    assert "ep=4 as given, dp a multiple of it" in out and rows and all(int(r[3]) % 4 == 0 for r in rows)
