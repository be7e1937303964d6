"""Expert parallelism (`parallel.ep`): the token all-to-all and its inverse, and the same
training step as one process at ep 2 and 4, with tp, pp and sequence parallelism, both
routers, shared experts, and expert gradients reduced over the dp/ep ranks holding them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from trident.errors import UserError
from trident.model.config import ModelConfig, preset
from trident.model.gpt import GPT
from trident.model.moe import expert_bias_state, moe_layers, moe_step_end, set_moe_loss_scale
from trident.parallel.topology import Topology, resolve_layout


def _cfg(**kw) -> ModelConfig:
    base = dict(n_layers=2, moe_experts=4, moe_top_k=2, moe_ffn_hidden=32, moe_aux_loss_coef=0.01)
    return preset("tiny", **{**base, **kw})


def test_ep_groups_are_runs_of_dp_ranks_and_edp_their_strides():
    lay = resolve_layout(8, tp=2, pp=1, ep=2)  # dp = 4: dp groups [0,2,4,6] and [1,3,5,7]
    assert lay.ep_groups() == [[0, 2], [4, 6], [1, 3], [5, 7]]
    assert lay.edp_groups() == [[0, 4], [2, 6], [1, 5], [3, 7]]
    lay = resolve_layout(8, tp=1, pp=2, ep=4)
    assert lay.ep_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]] and lay.edp_groups() == [[i] for i in range(8)]


def test_layout_errors_are_one_sentence():
    with pytest.raises(UserError, match=r"ep=3 does not divide dp=4"):
        resolve_layout(4, ep=3)
    with pytest.raises(UserError, match=r"parallel.ep=2 needs model.moe_experts divisible by ep, but the model has 3"):
        _cfg(moe_experts=3).check_tp(1, 2)
    with pytest.raises(UserError, match=r"a dense model"):
        preset("tiny").check_tp(1, 2)


def test_each_ep_rank_holds_its_share_of_the_experts_by_global_name():
    from trident.parallel.tensor.sharding import global_shapes, is_expert

    cfg = _cfg(moe_experts=8)
    full = set(global_shapes(GPT(cfg, Topology.single(), device="meta")))
    seen = set()
    for r in range(4):
        topo = Topology(layout=resolve_layout(4, ep=4), rank=r, device=torch.device("meta"))
        model = GPT(cfg, topo, device="meta")
        names = set(global_shapes(model))
        mine = {n for n in names if ".experts." in n}
        assert mine == {f"layers.{i}.mlp.experts.{e}.{w}.weight" for i in range(2) for e in (2 * r, 2 * r + 1)
                        for w in ("gate", "up", "down")}
        assert all(is_expert(p) == (".experts." in n) for n, p in model.named_parameters())
        seen |= names
    assert seen == full


# --- layouts (4 gloo ranks) ----------------------------------------------------------------------
# (tp, pp, ep, sequence parallel, config, schedule); dp = 4 / (tp * pp) and ep divides it
CASES = [
    (1, 1, 4, False, dict(moe_router="softmax"), {}),
    (1, 1, 2, False, dict(moe_router="sigmoid", moe_shared_experts=1, moe_bias_update_rate=0.01), {}),
    (2, 1, 2, False, dict(moe_router="softmax", moe_shared_experts=1), {}),
    (2, 1, 2, True, dict(moe_router="sigmoid", moe_bias_update_rate=0.01), {}),
    (1, 2, 2, False, dict(moe_router="softmax", moe_layer_freq=2, moe_z_loss_coef=1e-3), {}),
    (1, 2, 2, False, dict(moe_router="softmax", n_layers=4), {"schedule": "interleaved", "vpp": 2}),
]
M, MBS, SEQ = 2, 2, 16


def _layouts_match_one_process() -> list[str]:
    import torch.distributed as dist
    from equivalence import batch, gather_checked, rel_err
    from test_moe import _step

    from trident.model.stage import build_stage
    from trident.parallel.collectives import all_reduce
    from trident.parallel.pipeline.executor import run_pipeline
    from trident.parallel.pipeline.p2p import activation_shape
    from trident.parallel.tensor.sharding import global_shapes, is_expert

    checked = []
    for tp, pp, ep, sp, kw, sched in CASES:
        topo = Topology.from_initialized(tp=tp, pp=pp, ep=ep)
        dp = topo.dp
        cfg = dataclasses.replace(_cfg(), **kw)
        data = batch(cfg, seed=5, b=dp * M * MBS, s=SEQ)
        if dist.get_rank() == 0:  # the single-process reference: the whole global batch, dp x M microbatches
            ref_loss, ref_grads, ref_metrics, ref_bias = _step(cfg, data, micro=dp * M)
        model = build_stage(cfg, topo, sequence_parallel=sp, vpp=sched.get("vpp", 1))
        model.init_weights(0)
        set_moe_loss_scale(model, 1.0 / (M * dp))
        first = topo.dp_rank * M * MBS
        micro = [{k: v[first + i * MBS : first + (i + 1) * MBS] for k, v in data.items()} for i in range(M)]

        def grad_sync() -> None:  # experts over the dp/ep ranks that hold them, the rest over dp
            for p in model.parameters():
                all_reduce(p.grad, topo.edp_group if is_expert(p) else topo.dp_group)

        res = run_pipeline(model, topo, micro, act_shape=activation_shape(MBS, SEQ, cfg.hidden, tp, sp),
                           loss_divisor=data["tokens"].numel(), grad_sync=grad_sync, **sched)
        metrics = moe_step_end(model, cfg, topo)
        where = f"tp={tp} pp={pp} ep={ep} dp={dp} sp={sp} {kw} {sched}"
        grads = gather_checked(model, dist.group.WORLD, grads=True, names=global_shapes(GPT(cfg, Topology.single(),
                                                                                             device="meta")))
        saved = expert_bias_state(model, cfg, topo)
        assert metrics["moe_a2a_bytes"] > 0, where
        if dist.get_rank() == 0:
            assert res.loss == pytest.approx(ref_loss, rel=1e-5), where
            assert {k: v for k, v in metrics.items() if k != "moe_a2a_bytes"} == pytest.approx(ref_metrics, rel=1e-5)
            assert ".experts.3.down.weight" in " ".join(grads)
            for name, g in ref_grads.items():
                assert rel_err(grads[name], g) <= 1e-5, f"{where}: gradient of {name}"
            for layer in moe_layers(model):
                assert torch.equal(layer.router.expert_bias, ref_bias[layer.layer]), f"{where}: bias {layer.layer}"
            assert saved == {f"layers.{i}.mlp.router.expert_bias": b.double().tolist() for i, b in ref_bias.items()
                             if cfg.moe_bias_update_rate > 0}, where
        checked.append(where)
    return checked


def test_layouts_match_one_process(dist_pool):
    results = dist_pool.run(4, "test_moe_ep:_layouts_match_one_process", timeout=600)
    assert len(results[0]) == len(CASES)
