"""The MoE layer: routing, permutation, the grouped experts, balancing losses, and the
same step at (tp, pp, dp) layouts as in one process (experts replicated, expert_tp = 1)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from trident.errors import UserError
from trident.model.config import ModelConfig, preset
from trident.model.gpt import GPT
from trident.model.moe import (
    MoE,
    expert_bias_state,
    load_expert_bias,
    moe_layers,
    moe_step_end,
    permute,
    set_moe_loss_scale,
    unpermute,
)
from trident.parallel.topology import Topology

TINY_MOE = dict(moe_experts=4, moe_top_k=2, moe_ffn_hidden=32, moe_aux_loss_coef=0.01, moe_z_loss_coef=1e-3)


def _layer(cfg: ModelConfig, seed: int = 0) -> MoE:
    model = GPT(cfg, Topology.single())
    model.init_weights(seed)
    return model.layers["0"].mlp


def _cfg(**kw) -> ModelConfig:
    return preset("tiny", **{**TINY_MOE, **kw})


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_every_token_reaches_its_k_experts_with_its_gates(router):
    layer = _layer(_cfg(moe_router=router))
    x = torch.randn(30, 64)
    route = layer.router(x)
    logits = x @ layer.router.weight.T
    scores = logits.softmax(-1) if router == "softmax" else logits.sigmoid()
    top = scores.topk(2, -1)
    assert torch.equal(route.experts, top.indices)
    torch.testing.assert_close(route.gates, top.values / top.values.sum(-1, keepdim=True))
    x_sorted, dispatch = permute(x, route.experts, 4)
    assert dispatch.counts.tolist() == [int((route.experts == e).sum()) for e in range(4)]
    start = 0
    for e in range(4):  # expert e's block holds exactly the tokens that chose e, in token order
        tokens = [t for t in range(30) if e in route.experts[t].tolist()]
        assert torch.equal(x_sorted[start : start + len(tokens)], x[tokens])
        start += len(tokens)
    assert start == 60 and int(dispatch.dropped) == 0


def test_permute_then_unpermute_is_the_identity():
    x = torch.randn(17, 8)
    experts = torch.stack([torch.randperm(5)[:3] for _ in range(17)])  # k = 3 distinct of 5
    x_sorted, dispatch = permute(x, experts, 5)
    assert sorted(dispatch.order.tolist()) == list(range(51))
    assert torch.equal(unpermute(x_sorted, dispatch, torch.full((17, 3), 1.0)), 3 * x)


def _dense_reference(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, then the gates as a dense [T, E] mask (the E x blow-up)."""
    ex = layer.experts
    w1 = ex.gate_up.view(ex.n, 2 * ex.f, ex.h)
    w2 = ex.down.view(ex.n, ex.h, ex.f)
    route = layer.router(x)
    dense_gates = torch.zeros(x.shape[0], ex.n, dtype=x.dtype).scatter(1, route.experts, route.gates.to(x.dtype))
    out = torch.zeros_like(x)
    for e in range(ex.n):
        gate, up = F.linear(x, w1[e]).split(ex.f, -1)
        out += dense_gates[:, e : e + 1] * F.linear(F.silu(gate) * up, w2[e])
    return out


def test_grouped_mm_equals_expert_loop_equals_dense_reference():
    layer = _layer(_cfg(moe_ffn_hidden=16))
    x = torch.randn(40, 64)
    ref = _dense_reference(layer, x)
    outs, grads = [], []
    for grouped in (True, False):
        if grouped and not hasattr(torch, "_grouped_mm"):
            continue
        w = layer.experts.gate_up
        w.grad = None
        route = layer.router(x)
        x_sorted, dispatch = permute(x, route.experts, 4)
        y = unpermute(layer.experts(x_sorted, dispatch.counts, grouped=grouped), dispatch, route.gates)
        y.pow(2).sum().backward()
        outs.append(y.detach())
        grads.append(w.grad.clone())
    for y in outs:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[-1], rtol=1e-5, atol=1e-7)


def test_aux_and_z_loss_against_hand_computed_values():
    cfg = ModelConfig(vocab_size=8, hidden=2, n_heads=1, ffn_hidden=4, moe_experts=2, moe_top_k=1)
    layer = _layer(cfg)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2))  # logits = x
    s = 1 / (1 + math.exp(-1))  # softmax([1, 0])[0]
    balanced = layer.router(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert balanced.aux.item() == pytest.approx(1.0)  # f = P = (1/2, 1/2): E * sum f P = 1
    skewed = layer.router(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert skewed.aux.item() == pytest.approx(2 * s)  # f = (1, 0), P = (s, 1 - s)
    assert skewed.z.item() == pytest.approx(math.log(1 + math.e) ** 2)


def test_bias_steers_selection_only_and_moves_towards_balance():
    cfg = _cfg(moe_router="sigmoid", moe_bias_update_rate=0.1, n_layers=1)
    model = GPT(cfg, Topology.single())
    model.init_weights(0)
    layer = model.layers["0"].mlp
    x = torch.randn(1, 24, 64)
    layer.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 5.0]))  # experts 2 and 3 always win
    route = layer.router(x.view(-1, 64))
    assert sorted(set(route.experts.flatten().tolist())) == [2, 3]
    scores = (x.view(-1, 64) @ layer.router.weight.T).sigmoid()[:, 2:4]
    torch.testing.assert_close(route.gates.sort(-1).values, (scores / scores.sum(-1, keepdim=True)).sort(-1).values)
    model.train()
    model(torch.randint(0, 101, (2, 12)))
    metrics = moe_step_end(model, cfg, Topology.single())
    # load (0, 0, 24, 24) against a mean of 12: the starved experts move up, the busy ones down
    assert layer.router.expert_bias.tolist() == pytest.approx([0.1, 0.1, 4.9, 4.9])
    assert (metrics["moe_load_min.0"], metrics["moe_load_max.0"]) == (0.0, 24.0)
    assert not layer.stats  # the step's statistics were consumed
    # the bias survives a checkpoint's JSON exactly (it is not a parameter: the optimizer never touches it)
    layer.router.expert_bias.add_(torch.tensor([1e-7, 1 / 3, -2.5e-3, 0.0]))
    saved = json.loads(json.dumps(expert_bias_state(model, cfg, Topology.single())))
    fresh = GPT(cfg, Topology.single())
    load_expert_bias(fresh, saved)
    assert list(saved) == ["layers.0.mlp.router.expert_bias"]
    assert torch.equal(fresh.layers["0"].mlp.router.expert_bias, layer.router.expert_bias)


def test_capacity_drops_and_counts_the_overflow():
    x = torch.randn(10, 4)
    experts = torch.tensor([[0, 1]] * 7 + [[2, 1]] * 3)  # expert 1: 10 choices, expert 0: 7, expert 2: 3
    x_sorted, dispatch = permute(x, experts, 3, capacity=4)
    assert dispatch.counts.tolist() == [4, 4, 3] and int(dispatch.dropped) == 3 + 6
    y = unpermute(x_sorted, dispatch, torch.full((10, 2), 1.0))
    kept = torch.tensor([2, 2, 2, 2, 0, 0, 0, 1, 1, 1], dtype=torch.float32)  # first 4 tokens of 0 and of 1; all of 2
    assert torch.equal(y, kept[:, None] * x)
    layer = _layer(_cfg(moe_capacity_factor=0.5))
    model_in = torch.randn(1, 16, 64)
    layer.train()
    layer(model_in)
    assert float(layer.stats["dropped"]) == float((layer.stats["counts"] - 4).clamp_min(0).sum())


def test_config_errors_are_one_sentence():
    cases = [
        (dict(moe_experts=4, moe_top_k=5), "model.moe_top_k=5 must be a whole number in [1, model.moe_experts=4]"),
        (dict(moe_experts=4, moe_router="relu"), "model.moe_router is 'relu'"),
        (dict(moe_experts=4, moe_capacity_factor=0.0), "model.moe_capacity_factor must be > 0"),
        (dict(moe_experts=4, activation="gelu"), "MoE experts are SwiGLU without biases"),
        (dict(moe_experts=-1), "model.moe_experts must be a whole number >= 0"),
    ]
    for kw, message in cases:
        with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
            preset("tiny", **kw)
    with pytest.raises(UserError, match="not divisible by tp=4"):
        preset("tiny", moe_experts=4, moe_shared_experts=1, moe_ffn_hidden=6).check_tp(4)


def test_parameter_counts_active_and_total():
    cfg = _cfg(moe_shared_experts=1, moe_layer_freq=2, n_layers=4)
    model = GPT(cfg, Topology.single(), device="meta")
    pad = (128 - 101) * 64 * 2  # vocabulary padding rows (embedding and head)
    assert cfg.num_parameters() + pad == sum(p.numel() for p in model.parameters())
    per_expert = 3 * 64 * 32
    assert cfg.num_parameters() - cfg.num_parameters(active=True) == 2 * (4 - 2) * per_expert  # 2 MoE layers


def _step(cfg: ModelConfig, data: dict, recompute: str = "none", micro: int = 2) -> tuple[float, dict, dict, dict]:
    """One single-process training step in `micro` microbatches, as the trainer weights them."""
    from equivalence import gather_checked

    model = GPT(cfg, Topology.single(), recompute=recompute)
    model.init_weights(0)
    model.train()
    set_moe_loss_scale(model, 1.0 / micro)
    total = 0.0
    n = data["tokens"].numel()
    for tokens, labels in zip(data["tokens"].chunk(micro), data["labels"].chunk(micro)):
        loss = model(tokens, labels=labels).sum() / n
        loss.backward()
        total += loss.item()
    grads, metrics = gather_checked(model, None, grads=True), moe_step_end(model, cfg, Topology.single())
    return total, grads, metrics, {m.layer: m.router.expert_bias.clone() for m in moe_layers(model)}


def test_recompute_gives_the_same_step_and_counts_once():
    from equivalence import batch, rel_err

    cfg = _cfg(moe_shared_experts=1, moe_bias_update_rate=0.01)
    data = batch(cfg, b=4, s=16)
    loss, grads, metrics, _ = _step(cfg, data)
    assert grads["layers.1.mlp.router.weight"].norm() > 0
    for mode in ("selective", "full"):
        loss2, grads2, metrics2, _ = _step(cfg, data, recompute=mode)
        assert loss2 == pytest.approx(loss, rel=1e-6)
        assert metrics2 == pytest.approx(metrics)  # full recomputation does not count tokens twice
        for name, g in grads.items():
            assert rel_err(grads2[name], g) <= 1e-5, f"{mode}: {name}"
    assert metrics["moe_load_max.0"] <= 4 * 16 * 2 and metrics["moe_aux_loss"] > 0


def test_tiny_moe_trains():
    torch.manual_seed(0)
    cfg = _cfg(n_layers=2, moe_router="sigmoid", moe_shared_experts=1, moe_bias_update_rate=1e-3)
    model = GPT(cfg, Topology.single())
    model.init_weights(0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 101, (4, 33))
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = model(tokens[:, :-1], labels=tokens[:, 1:]).mean()
        loss.backward()
        opt.step()
        moe_step_end(model, cfg, Topology.single())
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


MOE_CLI = ["model.moe_experts=4", "model.moe_top_k=2", "model.moe_ffn_hidden=32", "model.moe_aux_loss_coef=0.01",
           "model.moe_bias_update_rate=0.01", "train.steps=4", "checkpoint.interval=-1"]


@pytest.fixture(scope="module")
def moe_run(data_dir, tmp_path_factory):
    """`trident train` of a tiny MoE with the selection bias moving fast, 4 steps uninterrupted."""
    from cli_helpers import CONFIG, TINY, trident

    run = tmp_path_factory.mktemp("moe-run")
    trident("train", "--config", str(CONFIG), "--run-dir", str(run), *TINY, *MOE_CLI, f"data.work_dir={data_dir}")
    return run


def test_trident_train_logs_moe_metrics_and_active_parameters(moe_run):
    """The trainer's hooks: the balancing-loss weight, the step's metrics, the FLOPs of active parameters."""
    from cli_helpers import records

    resolved = json.loads((moe_run / "config.json").read_text())
    cfg, derived = ModelConfig(**resolved["model"]), resolved["derived"]
    dense_flops = 6.0 * (cfg.num_parameters(include_embedding=False) + cfg.vocab_size * cfg.hidden) + 12 * 2 * 64 * 32
    idle = 6.0 * 2 * (4 - 2) * 3 * 64 * 32  # per token: 2 layers x 2 experts a token does not use
    assert derived["flops_per_step"] == pytest.approx((dense_flops - idle) * derived["tokens_per_step"])
    aux, loads = records(moe_run, "moe_aux_loss"), records(moe_run, "moe_load_max.1")
    assert len(aux) == 4 and all(0.015 < a < 0.03 for a in aux)  # 2 layers x 0.01 x (1.0 when balanced, more if not)
    assert all(0 < m <= 8 * 32 * 2 for m in loads)  # at most every (token, choice) of the global batch
    from trident.tools.plot import plot_run

    png = plot_run(moe_run, moe_run / "curves.png").read_bytes()  # a third panel: the expert load balance
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[20:24], "big") == 800  # 8 in high at 100 dpi


def test_resume_carries_the_selection_bias_exactly(data_dir, moe_run, tmp_path):
    """Saved at step 3 and resumed, the run logs the uninterrupted run's losses bit for bit: the
    bias (no parameter) travels in meta.json, by global layer name. (Step 3: the bias oscillates
    by +-rate per step, and after an even number of steps it can be all zero again.)"""
    from cli_helpers import CONFIG, TINY, losses, trident

    args = ["train", "--config", str(CONFIG), "--run-dir", str(tmp_path), *TINY, *MOE_CLI, f"data.work_dir={data_dir}"]
    trident(*args, "train.exit_interval=3", "checkpoint.interval=3")
    meta = json.loads((tmp_path / "checkpoints" / "step_0000003" / "meta.json").read_text())
    assert sorted(meta["expert_bias"]) == [f"layers.{i}.mlp.router.expert_bias" for i in (0, 1)]
    assert all(len(b) == 4 and 0 not in b for b in meta["expert_bias"].values())  # 3 steps of +-0.01: odd multiples
    trident(*args, "--resume")
    assert losses(tmp_path) == losses(moe_run) and len(losses(moe_run)) == 4  # exact float equality


# --- layouts (4 gloo ranks) ----------------------------------------------------------------------
# (tp, pp, dp, sequence parallel, config): softmax and sigmoid routers, shared experts, the bias
# update, dense and MoE blocks mixed; experts replicated over tp (expert_tp = 1)
CASES = [
    (2, 2, 1, False, dict(moe_router="softmax", moe_layer_freq=2)),
    (1, 2, 2, False, dict(moe_router="sigmoid", moe_shared_experts=1, moe_bias_update_rate=0.01)),
    (2, 1, 2, True, dict(moe_router="softmax", moe_shared_experts=1, moe_bias_update_rate=0.01)),
]
M, MBS, SEQ = 2, 2, 16


def _layouts_match_one_process() -> list[str]:
    import torch.distributed as dist
    from equivalence import batch, gather_checked, rel_err

    from trident.model.stage import build_stage
    from trident.parallel.collectives import all_reduce
    from trident.parallel.pipeline.executor import run_pipeline
    from trident.parallel.pipeline.p2p import activation_shape
    from trident.parallel.tensor.sharding import global_shapes

    checked = []
    for tp, pp, dp, sp, kw in CASES:
        topo = Topology.from_initialized(tp=tp, pp=pp)
        cfg = dataclasses.replace(_cfg(n_layers=2), **kw)  # at pp=2 one block per stage
        data = batch(cfg, seed=3, b=dp * M * MBS, s=SEQ)
        if dist.get_rank() == 0:  # the single-process reference: the whole global batch, dp x M microbatches
            ref_loss, ref_grads, ref_metrics, ref_bias = _step(cfg, data, micro=dp * M)
        model = build_stage(cfg, topo, sequence_parallel=sp)
        model.init_weights(0)
        set_moe_loss_scale(model, 1.0 / (M * dp))
        first = topo.dp_rank * M * MBS
        micro = [{k: v[first + i * MBS : first + (i + 1) * MBS] for k, v in data.items()} for i in range(M)]

        def grad_sync() -> None:
            for p in model.parameters():
                all_reduce(p.grad, topo.dp_group)

        res = run_pipeline(model, topo, micro, act_shape=activation_shape(MBS, SEQ, cfg.hidden, tp, sp),
                           loss_divisor=data["tokens"].numel(), grad_sync=grad_sync)
        metrics = moe_step_end(model, cfg, topo)
        where = f"tp={tp} pp={pp} dp={dp} sp={sp} {kw}"
        grads = gather_checked(model, dist.group.WORLD, grads=True, names=global_shapes(GPT(cfg, topo)))
        saved = expert_bias_state(model, cfg, topo)  # what a checkpoint's meta.json gets: every layer, on every rank
        if dist.get_rank() == 0:  # every rank's loss and metrics are global values; rank 0's stand for them
            assert res.loss == pytest.approx(ref_loss, rel=1e-5), where
            assert metrics == pytest.approx(ref_metrics, rel=1e-5), where
            for name, g in ref_grads.items():
                assert rel_err(grads[name], g) <= 1e-5, f"{where}: gradient of {name}"
            for layer in moe_layers(model):  # the bias moved by the global load, as in one process
                assert torch.equal(layer.router.expert_bias, ref_bias[layer.layer]), f"{where}: bias {layer.layer}"
            assert saved == {f"layers.{i}.mlp.router.expert_bias": b.double().tolist() for i, b in ref_bias.items()
                             if cfg.moe_bias_update_rate > 0}, where
        checked.append(where)
    return checked


def test_layouts_match_one_process(dist_pool):
    results = dist_pool.run(4, "test_moe:_layouts_match_one_process", timeout=600)
    assert len(results[0]) == len(CASES)
