"""Activation recomputation changes memory, never the step.

With dropout on the residual stream and on the attention probabilities (so every random
stream is drawn from, and a recomputation that redrew masks would change the result),
one training step under `recompute=selective` and `recompute=full` gives the same loss,
the same gradients (fp32, relative error <= 1e-6) and leaves every generator in the same
state as `recompute=none`, on 4 gloo ranks at:

* tp=2 with sequence parallelism (dp=2): the recomputed forward re-issues the
  all-gathers and reduce-scatters, and the `tp` stream must replay per rank;
* pp=2 with the 1F1B schedule (dp=2): the next microbatch's forward runs between a
  microbatch's forward and its recomputation, and must not see a replayed generator.

Single process: the saved-activation peak falls from none to selective to full.
"""

from __future__ import annotations

import dataclasses

import pytest

TOL = 1e-6
MBS, SEQ, M = 2, 16, 3  # micro batch, sequence, microbatches per step
MODES = ("none", "selective", "full")


def _variants() -> dict:
    from equivalence import VARIANTS

    return {
        # GQA + RoPE + RMSNorm + SwiGLU
        "gqa-rope": dataclasses.replace(VARIANTS["gqa-rope-rmsnorm-swiglu-untied"], n_layers=4),
        # learned positions, LayerNorm, GeLU, tied, QK-norm (parameters inside the core)
        "learned-qknorm-tied": dataclasses.replace(
            VARIANTS["mha-learned-layernorm-gelu-tied"], n_layers=4, qk_norm=True
        ),
    }


def _microbatches(cfg, dp_rank: int, packed: bool) -> list[dict]:
    import torch

    gen = torch.Generator().manual_seed(7)
    rows = 2 * M * MBS  # the global batch of dp=2
    tokens = torch.randint(0, cfg.vocab_size, (rows, SEQ + 1), generator=gen)
    data = {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}
    if packed:
        starts = torch.rand(rows, SEQ, generator=gen) < 0.2
        starts[:, 0] = False
        data["doc_ids"] = starts.long().cumsum(1)
    first = dp_rank * M * MBS
    return [{k: v[first + i * MBS : first + (i + 1) * MBS] for k, v in data.items()} for i in range(M)]


def _step(cfg, topo, mode: str, sp: bool, packed: bool) -> dict:
    """One 1F1B step of this rank's stage: loss, local gradients, generator states after."""
    import torch

    from trident.parallel.pipeline.p2p import activation_shape
    from trident.parallel.random import RNGStreams
    from trident.model.stage import build_stage
    from trident.parallel.pipeline.executor import run_pipeline

    torch.manual_seed(0)
    rng = RNGStreams(1234, topo)
    model = build_stage(cfg, topo, sequence_parallel=sp, rng=rng, recompute=mode)
    model.init_weights(0)
    model.train()
    micros = _microbatches(cfg, topo.dp_rank, packed)
    res = run_pipeline(model, topo, micros, act_shape=activation_shape(MBS, SEQ, cfg.hidden, topo.tp, sp),
                       loss_divisor=float(2 * M * MBS * SEQ), schedule="1f1b")
    return {
        "loss": res.loss,
        "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
        "rng": rng.state_dict(),
        "cpu_rng": torch.get_rng_state(),
        "peak_in_flight": res.peak_in_flight,
    }


def _check_layouts() -> list[dict]:
    import torch

    from equivalence import rel_err
    from trident.parallel.topology import Topology

    report = []
    for layout in ((2, 1), (1, 2)):  # (tp, pp); dp = 2
        topo = Topology.from_initialized(tp=layout[0], pp=layout[1])
        sp = topo.tp > 1
        for name, base in _variants().items():
            packed = name == "learned-qknorm-tied"
            cfg = dataclasses.replace(base, dropout=0.1, attention_dropout=0.1)
            where = f"tp={topo.tp} pp={topo.pp} sp={sp} {name}"
            ref = _step(cfg, topo, "none", sp, packed)
            plain = _step(dataclasses.replace(cfg, dropout=0.0, attention_dropout=0.0), topo, "none", sp, packed)
            # the dropout masks matter, so a recomputation that redrew them would show
            moved = max(rel_err(g, plain["grads"][n]) for n, g in ref["grads"].items())
            assert moved > 0.05 and ref["loss"] != plain["loss"], f"{where}: dropout hardly changes the step ({moved})"
            for mode in ("selective", "full"):
                got = _step(cfg, topo, mode, sp, packed)
                loss_err = abs(got["loss"] / ref["loss"] - 1)
                assert loss_err <= TOL, f"{where} {mode}: loss {got['loss']} vs {ref['loss']}"
                worst = 0.0
                for pname, g in got["grads"].items():
                    err = rel_err(g, ref["grads"][pname])
                    assert err <= TOL, f"{where} {mode}: gradient of {pname} differs, relative error {err:.2e}"
                    worst = max(worst, err)
                for stream, state in got["rng"].items():
                    assert torch.equal(state, ref["rng"][stream]), f"{where} {mode}: stream {stream} ended elsewhere"
                assert torch.equal(got["cpu_rng"], ref["cpu_rng"]), f"{where} {mode}: default generator ended elsewhere"
                report.append({"where": f"{where} {mode}", "loss_err": loss_err, "grad_err": worst,
                               "dropout_moved": moved, "in_flight": got["peak_in_flight"]})
    return report


def test_recompute_equals_none_under_tp_sp_and_1f1b(dist_pool):
    results = dist_pool.run(4, "test_recompute:_check_layouts", timeout=300)
    report = results[0]
    assert len(report) == 2 * 2 * 2  # layouts x variants x modes
    # the pp=2 cases really interleaved microbatches: stage 0 held two at once
    assert max(r["in_flight"] for r in report if "pp=2" in r["where"]) == 2
    assert all(r["dropout_moved"] > 0.05 for r in report)


def _peak(mode: str, cfg) -> tuple[int, int, float]:
    from equivalence import batch
    from trident.model.gpt import GPT
    from trident.parallel.random import RNGStreams
    from trident.parallel.topology import Topology
    from trident.training.memory import ActivationMeter

    topo = Topology.single()
    model = GPT(cfg, topo, rng=RNGStreams(0, topo), recompute=mode)
    model.init_weights(0)
    data = batch(cfg, b=4, s=32)
    with ActivationMeter(model) as meter:
        loss = model(data["tokens"], labels=data["labels"]).mean()
        loss.backward()
    grad_sq = sum(float(p.grad.double().pow(2).sum()) for p in model.parameters())
    return meter.peak_bytes, meter.live_bytes, grad_sq


def test_saved_activation_peak_falls_with_recomputation():
    from trident.model.config import preset

    cfg = preset("tiny", n_layers=4, dropout=0.1, max_seq_len=32)
    peaks = {mode: _peak(mode, cfg) for mode in MODES}
    none, selective, full = (peaks[m][0] for m in MODES)
    assert full < selective < none, peaks
    # full keeps one [b, s, h] input per layer instead of a layer's worth of tensors
    assert full < 0.5 * none, peaks
    assert all(live == 0 for _, live, _ in peaks.values()), "saved tensors outlived backward"
    # and the gradients are the same, single process too
    assert all(abs(g / peaks["none"][2] - 1) <= TOL for _, _, g in peaks.values()), peaks


def test_eval_and_bad_mode():
    import torch

    from trident.errors import UserError
    from trident.model.config import preset
    from trident.model.gpt import GPT
    from trident.parallel.topology import Topology
    from trident.training.config import load_config

    cfg = preset("tiny")
    topo = Topology.single()
    with pytest.raises(UserError, match="recompute is 'some'; valid values are none, selective, full"):
        GPT(cfg, topo, recompute="some")
    with pytest.raises(UserError, match="train.recompute is 'all'; valid values are none, selective, full"):
        load_config(None, ["train.recompute=all"])
    # evaluation never recomputes (no graph to rebuild), and gives the same logits
    tokens = torch.randint(0, cfg.vocab_size, (2, 8))
    outs = []
    for mode in MODES:
        model = GPT(cfg, topo, recompute=mode)
        model.init_weights(0)
        model.eval()
        with torch.no_grad():
            outs.append(model(tokens))
    assert all(torch.equal(o, outs[0]) for o in outs)
