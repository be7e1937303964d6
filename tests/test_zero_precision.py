"""Mixed precision under dp/tp and every zero stage (ZeRO-3 included: the loss scale and the
inf verdict are the same whatever holds the parameters).

fp16: an inf injected into ONE rank's reduced gradient shard makes every rank skip the
step together (parameters, optimizer state and step count untouched, `stepped` False so
the LR schedule does not advance) and back off the loss scale; the next clean step
proceeds. fp32 with the default policy raises a clear error on every rank instead.
bf16: training on CPU runs, and its loss tracks fp32 closely over 20 steps.
"""

from __future__ import annotations


def _snapshot(model, opt) -> list:
    # ZeRO-3 holds parameters as shards (the model's are placeholders between steps)
    params = [u.shard for u in opt.buffer.buckets] if opt.cfg.zero == 3 else list(model.parameters())
    return [t.detach().clone() for t in params + opt.exp_avg + opt.exp_avg_sq + opt.master]


def _fp16_skip_and_errors() -> list[dict]:
    import torch
    from test_zero_equivalence import build, config, global_batch, train_step

    from trident.parallel.topology import Topology
    from trident.parallel.zero.clip import NonFiniteGradientError

    cfg = config()
    topo = Topology.from_initialized(tp=2)  # 4 ranks: tp=2 x dp=2
    out = []
    for zero in (0, 1, 2, 3):
        model, opt = build(cfg, topo, zero, dtype="fp16")
        opt.scaler.scale = 2.0**10  # a scale whose backoff is exact and visible
        first, _ = train_step(model, opt, topo, global_batch(cfg, 0))
        before, count, scale = _snapshot(model, opt), opt.step_count, opt.loss_scale

        def inject(o):
            if topo.rank == 3:  # one tp rank of one dp replica only
                o.buffer.buckets[-1].main_grad[1] = float("inf")

        skipped, _ = train_step(model, opt, topo, global_batch(cfg, 1), inject=inject)
        after = _snapshot(model, opt)
        untouched = all(torch.equal(a, b) for a, b in zip(before, after))
        record = {
            "zero": zero,
            "first": first.stepped,
            "skipped": skipped.stepped,
            "untouched": untouched,
            "count_same": opt.step_count == count,
            "scale_before": scale,
            "scale_after": skipped.loss_scale,
        }
        resumed, loss = train_step(model, opt, topo, global_batch(cfg, 1))
        record.update(resumed=resumed.stepped, loss_finite=loss == loss, count_after=opt.step_count)
        out.append(record)

    # fp32 with the default policy: a clear error, raised on every rank together
    model, opt = build(cfg, topo, 1)

    def inject_nan(o):
        if topo.rank == 0:
            o.buffer.buckets[0].main_grad[0] = float("nan")

    try:
        train_step(model, opt, topo, global_batch(cfg, 0), inject=inject_nan)
        out.append({"error": None})
    except NonFiniteGradientError as err:
        out.append({"error": str(err)})
    return out


def test_fp16_inf_skips_everywhere(dist_pool):
    results = dist_pool.run(4, "test_zero_precision:_fp16_skip_and_errors", timeout=300)
    for per_rank in results:
        assert per_rank == results[0]  # every rank made the same decisions
    *cases, error = results[0]
    assert [c["zero"] for c in cases] == [0, 1, 2, 3]
    for c in cases:
        where = f"zero={c['zero']}"
        assert c["first"] and not c["skipped"] and c["resumed"], (where, c)
        assert c["untouched"], f"{where}: a skipped step changed parameters or optimizer state"
        assert c["count_same"] and c["count_after"] == 2, (where, c)
        assert c["scale_after"] == c["scale_before"] / 2, (where, c)
        assert c["loss_finite"], where
    assert error["error"] is not None and "inf/NaN" in error["error"] and "train.nonfinite=skip" in error["error"]


def _bf16_tracks_fp32() -> dict:
    from test_zero_equivalence import build, config, global_batch, train_step

    from trident.parallel.topology import Topology

    cfg = config()
    topo = Topology.from_initialized(tp=1)  # dp = 2
    losses = {}
    for dtype, zero in (("fp32", 1), ("bf16", 1), ("bf16", 3)):
        model, opt = build(cfg, topo, zero=zero, dtype=dtype, lr=1e-2)
        trace = []
        for step in range(20):
            result, loss = train_step(model, opt, topo, global_batch(cfg, step % 4))
            assert result.stepped
            trace.append(loss)
        losses[f"{dtype}-zero{zero}"] = trace
        if dtype == "bf16":
            assert all(p.dtype.is_floating_point and str(p.dtype) == "torch.bfloat16" for p in model.parameters())
            assert opt.memory()["master_bytes"] > 0  # fp32 master weights beside bf16 params
    return losses


def test_bf16_loss_tracks_fp32(dist_pool):
    losses = dist_pool.run(2, "test_zero_precision:_bf16_tracks_fp32", timeout=300)[0]
    fp32 = losses["fp32-zero1"]
    assert fp32[-1] < 0.85 * fp32[0], f"fp32 did not learn: {fp32}"
    for name in ("bf16-zero1", "bf16-zero3"):
        gaps = [abs(b - a) / a for a, b in zip(fp32, losses[name])]
        assert max(gaps) <= 0.03, f"{name} strays from fp32 (relative gaps {gaps})"
        assert sum(gaps) / len(gaps) <= 0.01, f"{name} strays from fp32 on average (relative gaps {gaps})"
