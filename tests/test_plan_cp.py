"""The planner under context parallelism (cp): activations by 1/cp plus the ring's
buffers, optimizer and gradient state over dp·cp, the ring's traffic, the layout search,
`trident plan --cp`, and the prediction against a measured cp step.

The arithmetic tests build nothing. The measured case runs one real step of ring
attention (`trident.parallel.context.ring_attention`) under the activation meter, as
tests/test_memory_plan.py does at cp = 1, and holds the planner to the same 1% (its
parameter, gradient and optimizer bytes exactly: buckets padded and sharded over dp·cp).
"""

from __future__ import annotations

import dataclasses

import pytest

MBS, SEQ = 2, 32


def _model(**overrides):
    from trident.model.config import preset

    return preset("tiny", **{"vocab_size": 512, "n_layers": 4, "max_seq_len": SEQ, **overrides})


def _settings(**kw):
    from trident.planning.plan import Settings

    values = dict(tp=1, pp=1, dp=1, cp=1, zero=1, recompute="none", micro_batch_size=MBS, seq_len=SEQ,
                  global_batch_size=2 * MBS, sequence_parallel=False, dtype="fp32", doc_masking=False)
    values.update(kw)
    return Settings(**values)


def test_activations_fall_by_cp_plus_the_ring_buffers():
    """Every saved tensor is [.., s/cp, ..]: a rank's activations are cp=1's over cp, give or
    take the ring's own saved tensors; the ring's K/V and dK/dV blocks sit on top, exactly
    2 K/V blocks + 3 fp32 dK/dV accumulators of [b, kv/tp, s/cp, head_dim]."""
    from trident.planning.planner import make_plan

    cfg = _model()  # hidden 64, 8 heads of 8, 4 kv heads, RoPE, SwiGLU
    one = make_plan(cfg, _settings(), "cpu").stages[0]
    assert one.activations.ring_buffer == 0
    for cp in (2, 4):
        st = _settings(cp=cp)
        assert st.world == cp and st.local_seq == SEQ // cp and st.microbatches == 2  # cp ranks share samples
        stage = make_plan(cfg, st, "cpu").stages[0]
        sl = SEQ // cp
        kv_block = 2 * 4 * MBS * 4 * sl * 8  # k and v, fp32
        dkv_block = 2 * 4 * MBS * 4 * sl * 8  # dK and dV, fp32
        assert stage.activations.ring_buffer == 2 * kv_block + 3 * dkv_block
        assert stage.peak_bytes - stage.activation_bytes == (
            stage.param_bytes + stage.state.grad_peak_bytes + stage.optimizer_bytes + stage.activations.ring_buffer)
        ratio = stage.activation_bytes / one.activation_bytes
        assert abs(ratio * cp - 1) < 0.1, (cp, ratio)
        # 1F1B at pp = 1: one microbatch held. Per token and layer (fp32): 2 norms (input, rstd),
        # the qkv and MLP inputs; the ring core's roped q and k, its output (the projection's
        # input is a view of it) and the fp32 lse; the qkv (v is a view of it); gate and up
        per_token_layer = 4 * (2 * (64 + 1) + 2 * 64 + 64 + 32 + 64 + 8 + (64 + 2 * 32) + 2 * 128)
        tables = 2 * 4 * 8  # RoPE cos, sin per token
        embedding = 8 + 1  # token ids, out-of-slice mask
        head = 4 * (64 + 1) + 4 * 64 + 4 * 512 + 8  # final norm, head input, fp32 softmax, targets
        want = MBS * sl * (4 * per_token_layer + tables + embedding + head) + 4
        assert stage.activation_bytes == want
        assert stage.activation_bytes < one.activation_bytes / cp + stage.activations.ring_buffer


def test_state_shards_over_dp_times_cp():
    """ZeRO-1/2 shard over dp·cp: cp=2, dp=2 holds what dp=4 does; ZeRO-0 keeps it all."""
    from trident.planning.planner import make_plan

    cfg = _model()
    dp4 = make_plan(cfg, _settings(dp=4, global_batch_size=4 * MBS), "cpu").stages[0]
    for zero in (1, 2):
        cp2 = make_plan(cfg, _settings(dp=2, cp=2, zero=zero, global_batch_size=2 * MBS), "cpu").stages[0]
        flat = make_plan(cfg, _settings(dp=1, cp=1, zero=zero), "cpu").stages[0]
        assert cp2.state.padded_numel % (4 * 16) == 0  # buckets padded to dp·cp·16 elements
        assert cp2.optimizer_bytes * 4 == cp2.state.padded_numel * 4 * 2  # exp_avg, exp_avg_sq (fp32): a quarter
        assert cp2.optimizer_bytes < flat.optimizer_bytes / 3
        if zero == 1:
            assert cp2.optimizer_bytes == dp4.optimizer_bytes
        else:
            assert cp2.grad_bytes == cp2.state.padded_numel * 4 // 4
    z0 = make_plan(cfg, _settings(cp=2, zero=0), "cpu").stages[0]
    assert z0.optimizer_bytes == z0.state.padded_numel * 4 * 2


def test_ring_traffic_and_flops_per_rank():
    """The cp group sends (cp-1) K/V blocks per layer per microbatch forward, and (cp-1)
    K/V blocks + cp dK/dV accumulators backward; every rank's FLOPs fall by cp."""
    from trident.planning.plan_cost import _stage_flops_per_microbatch, ring_bytes_per_layer
    from trident.planning.planner import make_plan

    cfg = _model()
    one = make_plan(cfg, _settings(), "H100")
    assert "cp" not in one.comm_bytes
    for cp in (2, 4):
        plan = make_plan(cfg, _settings(cp=cp), "H100")
        sl = SEQ // cp
        kv, dkv = 2 * 4 * MBS * 4 * sl * 8, 2 * 4 * MBS * 4 * sl * 8
        assert ring_bytes_per_layer(cfg, plan.settings) == ((cp - 1) * kv, (cp - 1) * kv + cp * dkv)
        assert plan.comm_bytes["cp"] == 4 * 2 * ((cp - 1) * kv + (cp - 1) * kv + cp * dkv)  # 4 layers, 2 microbatches
        per_rank = _stage_flops_per_microbatch(cfg, plan.settings, plan.stages[0])
        assert per_rank * cp == pytest.approx(_stage_flops_per_microbatch(cfg, one.settings, one.stages[0]))
        assert plan.model_flops == one.model_flops  # the job's work does not change, only who does it
        assert 0 <= plan.breakdown["ring_exposed"] <= plan.breakdown["ring"]
    selective = make_plan(cfg, _settings(cp=2, recompute="selective"), "H100")  # the core's ring replays
    assert selective.comm_bytes["cp"] > make_plan(cfg, _settings(cp=2), "H100").comm_bytes["cp"]


def test_bad_cp_layouts_are_one_sentence():
    from trident.errors import UserError
    from trident.planning.planner import make_plan

    cfg = _model()
    with pytest.raises(UserError, match="sequence length 32 is not divisible by 2\\*cp = 12"):
        make_plan(cfg, _settings(cp=6), "cpu")
    with pytest.raises(UserError, match="cp must be a whole number >= 1, got 0"):
        make_plan(cfg, _settings(cp=0), "cpu")
    with pytest.raises(UserError, match="model.attention_dropout=0.1 cannot be used with cp=2"):
        make_plan(_model(attention_dropout=0.1), _settings(cp=2), "cpu")
    with pytest.raises(UserError, match="seq_len/cp = 32/4 = 8 is not divisible by tp=16"):
        make_plan(_model(n_heads=16, n_kv_heads=16), _settings(cp=4, tp=16, sequence_parallel=True), "cpu")


def test_search_turns_to_cp_when_nothing_else_fits():
    """A long sequence that no (tp, pp, dp) of 8 devices fits at cp = 1: the search returns
    cp > 1 layouts, each sized tp·cp·pp·dp = 8, with cp dividing seq_len into 2·cp chunks."""
    from trident.errors import UserError
    from trident.planning.planner import cp_sizes, search

    cfg = _model(max_seq_len=4096, n_heads=2, n_kv_heads=2)  # tp <= 2: only cp can cut activations further
    base = _settings(seq_len=4096, global_batch_size=8, micro_batch_size=1)
    memory = 10**7
    assert not search(cfg, base, 8, memory, "cpu", fixed={"cp": 1})
    found = search(cfg, base, 8, memory, "cpu")
    assert found and all(p.settings.cp > 1 and p.settings.world == 8 and p.fits(memory) for p in found)
    assert {p.settings.cp for p in found} <= {2, 4, 8}
    assert cp_sizes(4096, 8, {}) == [1, 2, 4, 8] and cp_sizes(24, 8, {}) == [1, 2, 4]  # 24 % 16 != 0
    with pytest.raises(UserError, match="cp=3 must divide devices=8 .* valid cp sizes here are 1, 2, 4, 8"):
        search(cfg, base, 8, memory, "cpu", fixed={"cp": 3})
    # short sequences that fit at cp = 1 are not offered cp; from 8192 tokens on, cp is always tried
    short = search(cfg, dataclasses.replace(base, seq_len=64), 8, 10**9, "cpu")
    assert short and all(p.settings.cp == 1 for p in short)
    long_cfg = _model(max_seq_len=8192)
    long = search(long_cfg, dataclasses.replace(base, seq_len=8192), 8, 10**12, "cpu")
    assert {p.settings.cp for p in long} == {1, 2, 4, 8}


def test_plan_command_with_cp(capsys):
    from cli_helpers import CONFIG

    from trident.tools.cli import main

    assert main(["plan", "--config", str(CONFIG), "--tp", "2", "--cp", "2", "--dp", "2", "--device-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "layout tp=2 cp=2 pp=1 dp=2 (8 devices)" in out
    assert "cp=2: each rank holds" in out and "ring's K/V + fp32 dK/dV blocks" in out
    assert "dp·cp " in out and "cp ring " in out and "hidden behind attention" in out
    assert main(["plan", "--config", str(CONFIG), "--cp", "3"]) == 2
    assert "is not divisible by 2*cp = 6" in capsys.readouterr().err
    assert main(["plan", "--config", str(CONFIG), "--devices", "4", "--cp", "2", "--device-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.lstrip().startswith("tp "))
    assert header.split()[:4] == ["tp", "cp", "pp", "dp"]
    rows = [line.split() for line in out.splitlines()[2:] if line.strip()]
    assert rows and all(r[1] == "2" for r in rows)


# --- measured ---------------------------------------------------------------------------------
CASES = [dict(zero=1, recompute="none", dtype="fp32"), dict(zero=2, recompute="selective", dtype="bf16"),
         dict(zero=0, recompute="full", dtype="fp32", packed=True),
         dict(zero=1, recompute="selective", dtype="fp32", model={"position": "learned", "norm": "layernorm"}),
         dict(zero=1, recompute="none", dtype="bf16", packed=True, model={"position": "alibi", "qk_norm": True}),
         dict(zero=1, recompute="selective", dtype="fp32", model={"qk_norm": True, "norm": "layernorm"})]


def _measure(tp: int, cp: int, sp: bool, cases: list[dict]) -> list[dict]:
    """One step per case at (tp, cp) on this rank: the measured report and the plan."""
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

    topo = Topology.from_initialized(tp=tp, cp=cp)
    out = []
    for case in cases:
        cfg = _model(**case.get("model", {}))
        st = _settings(tp=tp, cp=cp, sequence_parallel=sp, zero=case["zero"], recompute=case["recompute"],
                       dtype=case["dtype"], doc_masking=case.get("packed", False))
        model = build_stage(cfg, topo, sequence_parallel=sp, rng=RNGStreams(0, topo), dtype=parse_dtype(st.dtype),
                            recompute=st.recompute)
        model.init_weights(0)
        model.train()
        opt = DistributedOptimizer(model, topo, OptimizerConfig(zero=st.zero), MixedPrecisionConfig(dtype=st.dtype))
        gen = torch.Generator().manual_seed(3)
        tokens = torch.randint(0, cfg.vocab_size, (st.global_batch_size, SEQ + 1), generator=gen)
        data = {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}
        if st.doc_masking:
            data["doc_ids"] = (torch.rand(st.global_batch_size, SEQ, generator=gen) < 0.1).long().cumsum(1)
        micros = [{k: v[i * MBS:(i + 1) * MBS] for k, v in data.items()} for i in range(st.microbatches)]
        opt.zero_grad()
        with ActivationMeter(model) as meter:
            run_pipeline(model, topo, micros, act_shape=activation_shape(MBS, SEQ, cfg.hidden, tp, sp, cp),
                         loss_divisor=float(st.global_batch_size * SEQ), grad_sync=opt.grad_sync,
                         before_backward=opt.before_backward)
        assert opt.step().stepped
        measured = rank_memory(model, opt, meter.peak_bytes, "saved-tensors")
        planned = make_plan(cfg, st, "cpu").stages[0]
        out.append({"case": case, "rank": topo.rank, "measured": measured.values(),
                    "planned": [planned.param_bytes, planned.grad_bytes, planned.optimizer_bytes,
                                planned.activation_bytes, planned.measurable_bytes]})
    return out


@pytest.mark.parametrize("tp,cp,sp", [(1, 2, False), (2, 2, True)], ids=["cp2", "tp2-cp2-sp"])
def test_planner_predicts_a_measured_cp_step(dist_pool, tp, cp, sp):
    results = dist_pool.run(tp * cp, "test_plan_cp:_measure", timeout=240, tp=tp, cp=cp, sp=sp, cases=CASES)
    names = ("params", "grads", "optimizer", "activations", "total")
    for rank_rows in results:
        for row in rank_rows:
            where = f"tp={tp} cp={cp} rank {row['rank']} {row['case']}"
            got, want = dict(zip(names, row["measured"])), dict(zip(names, row["planned"]))
            for key in ("params", "grads", "optimizer"):
                assert want[key] == got[key], f"{where}: {key} planned {want[key]} vs measured {got[key]}"
            for key in ("activations", "total"):
                err = want[key] / got[key] - 1
                assert abs(err) <= 0.01, f"{where}: {key} planned {want[key]} vs measured {got[key]} ({err:+.1%})"
