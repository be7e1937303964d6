"""`trident plan` on a mixture of experts: the planned parameter, gradient and optimizer bytes
equal the built model's (all E experts, the router, shared experts; ZeRO buckets and
tp-partial flags as `DistributedOptimizer` packs them), and the planned activation peak the
measured one (the routed T·k rows of the experts instead of the dense MLP's; dense blocks
between MoE ones as dense; under ZB-H1 too). Expert parallelism: tests/test_plan_ep.py.

Reuses `test_memory_plan._measure` (one real step under `ActivationMeter`, then `make_plan`)
with an MoE model in place of its dense one.
"""

from __future__ import annotations

import pytest

MOE = dict(moe_experts=4, moe_top_k=2, moe_ffn_hidden=32, moe_aux_loss_coef=0.01, moe_z_loss_coef=0.001)
# (tp, pp, dp) -> cases; "shared": one shared expert; "freq": every freq-th block MoE, the others
# dense (priced each as what it is); "layers": n_layers (2 by default)
CASES = {
    (1, 1, 1): [dict(zero=1, recompute="none", m=2), dict(zero=0, recompute="full", m=2, shared=1),
                dict(zero=1, recompute="selective", m=1, dtype="bf16", shared=1),
                dict(zero=1, recompute="selective", m=1, layers=3, freq=2),
                dict(zero=0, recompute="full", m=1, layers=3, freq=2, dtype="bf16")],
    (2, 1, 1): [dict(zero=1, recompute="none", m=2, sp=True, shared=1)],
    # ZB-H1: an MoE block's B frees its routed part (its router and experts are no deferred linears)
    (1, 2, 1): [dict(zero=1, recompute="none", m=2, schedule="zb-h1", layers=4),
                dict(zero=0, recompute="selective", m=2, schedule="zb-h1", layers=4, shared=1, freq=2),
                dict(zero=1, recompute="full", m=3, layers=4, freq=2)],
}


def _measure_moe(layout: list[int], cases: list[dict]) -> list[dict]:
    import test_memory_plan as plan_test
    import torch

    from trident.model.config import preset
    from trident.model.moe import grouped_mm_supported

    for dtype in (torch.float32, torch.bfloat16):  # probe outside the meter (its own tensors are no activations)
        grouped_mm_supported(torch.device("cpu"), dtype, 64, 32)
    dense = plan_test._model
    plan_test._model = lambda case: preset("tiny", vocab_size=512, n_layers=case.get("layers", 2),
                                           max_seq_len=plan_test.SEQ, moe_shared_experts=case.get("shared", 0),
                                           moe_layer_freq=case.get("freq", 1), **MOE)
    try:
        return plan_test._measure(layout, cases)
    finally:  # the pool's workers (and this process at world 1) live on to run the dense tests
        plan_test._model = dense


@pytest.mark.parametrize("layout", list(CASES), ids=lambda lay: "x".join(map(str, lay)))
def test_plan_counts_every_expert_and_the_routed_activations(dist_pool, layout):
    world = layout[0] * layout[1] * layout[2]
    if world == 1:
        results = [_measure_moe(list(layout), CASES[layout])]
    else:
        results = dist_pool.run(world, "test_plan_moe:_measure_moe", timeout=240, layout=list(layout),
                                cases=CASES[layout])
    names = ("params", "grads", "optimizer", "activations", "total")
    for rank_rows in results:
        for row in rank_rows:
            where = f"layout {layout} rank {row['rank']} {row['case']}"
            got, want = dict(zip(names, row["measured"])), dict(zip(names, row["planned"]))
            for key in ("params", "grads", "optimizer"):
                assert want[key] == got[key], f"{where}: {key} planned {want[key]} vs measured {got[key]}"
            err = want["activations"] / got["activations"] - 1
            assert abs(err) <= 0.01, f"{where}: activations planned {want['activations']} vs {got['activations']}"


def test_plan_parameters_are_total_not_active():
    """The plan holds all E experts of every MoE block: the model's total parameters, not its active ones."""
    from trident.model.config import preset
    from trident.planning.plan_state import stage_params

    moe = preset("tiny", n_layers=2, **MOE)
    names = {p.name: p.numel for p in stage_params(moe, tp=1, pp=1, stage=0)}
    assert names["layers.0.mlp.experts.gate_up"] == 4 * 2 * 32 * 64
    assert names["layers.1.mlp.experts.down"] == 4 * 64 * 32
    assert sum(names.values()) == moe.num_parameters() + (128 - 101) * 64 * 2  # + the vocabulary padding rows
