"""MFU is never above 1.0, and a measured CPU peak is never below the rate a step reached."""

from __future__ import annotations

import pytest
import torch

from trident.training import metrics
from trident.training.metrics import device_peak_tflops, model_flops_utilization

CPU = torch.device("cpu")


def test_mfu_above_one_against_a_declared_or_configured_peak_is_refused():
    with pytest.raises(ValueError, match=r"mfu 1\.100 > 1\.0.*declared H100 bf16"):
        model_flops_utilization(1087.9, 989.0, "declared H100 bf16")
    with pytest.raises(ValueError, match="log.peak_tflops"):
        model_flops_utilization(2.0, 1.0, "configured log.peak_tflops")
    assert model_flops_utilization(494.5, 989.0, "declared H100 bf16") == (0.5, 989.0, "declared H100 bf16")


def test_measured_cpu_peak_is_at_least_the_achieved_rate():
    peak, source = device_peak_tflops(CPU, "fp32")
    assert peak > 0 and source == "measured CPU float32 matmul"
    assert device_peak_tflops(CPU, "fp32") == (peak, source)  # measured once per process
    achieved = 10 * peak  # a step faster than the measured matmul (a noisy measurement)
    raised, raised_source = device_peak_tflops(CPU, "fp32", achieved=achieved)
    assert raised >= achieved and "raised to a step's achieved rate" in raised_source
    mfu, used, used_source = model_flops_utilization(20 * peak, peak, source)
    assert mfu == 1.0 and used == 20 * peak and used_source.startswith("measured CPU float32 matmul")
    assert device_peak_tflops(CPU, "fp32")[0] >= achieved  # the cached peak keeps the best rate seen
    mfu, _, _ = model_flops_utilization(0.5 * peak, peak, source)
    assert 0 < mfu <= 1.0


def test_configured_peak_wins_and_bad_inputs_are_refused():
    assert device_peak_tflops(CPU, "bf16", configured=123.0) == (123.0, "configured log.peak_tflops")
    with pytest.raises(ValueError):
        model_flops_utilization(float("nan"), 1.0, "declared H100 bf16")
    with pytest.raises(ValueError):
        model_flops_utilization(1.0, 0.0, "measured CPU float32 matmul")


def test_measured_matmul_sizes_span_the_cache_range():
    assert min(metrics.MEASURE_SIZES) <= 512 and max(metrics.MEASURE_SIZES) >= 2048


def test_metrics_writer_drops_records_after_the_resumed_step(tmp_path):
    """A run resumed at step 2 re-runs steps 3..: their old records (and a line cut short by
    a crash) go, the earlier ones stay, and nothing changes when there is nothing to drop."""
    import json

    from trident.training.metrics import MetricsWriter, read_metrics

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": float(s)}) for s in (1, 2, 3, 4)] + ['{"step": 5, "lo']
    path.write_text("\n".join(lines) + "\n")
    MetricsWriter(tmp_path, enabled=True, start_step=2).write({"step": 3, "loss": 30.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    before = path.read_text()
    MetricsWriter(tmp_path, enabled=True, start_step=3)
    assert path.read_text() == before
    MetricsWriter(tmp_path, enabled=False, start_step=0)  # not the logging rank: never touches the file
    assert path.read_text() == before


def _peak_on_ranks() -> dict:
    """Each rank's measured peak via `measured_peak_by_rank0`, with only rank 0 allowed to time."""
    import torch.distributed as dist

    metrics._MEASURED.clear()
    if dist.get_rank() != 0:
        def refuse(*_args):
            raise AssertionError("a rank other than 0 timed the matmul peak")
        metrics.measured_peak_tflops, real = refuse, metrics.measured_peak_tflops
    try:
        peak = metrics.measured_peak_by_rank0(CPU, torch.float32)
        return {"peak": peak, "cached": metrics._MEASURED[(str(CPU), torch.float32)]}
    finally:
        if dist.get_rank() != 0:
            metrics.measured_peak_tflops = real


def test_the_peak_is_timed_by_rank_0_alone_and_every_rank_gets_its_figure(dist_pool):
    """Ranks sharing a machine would time their matmuls against each other: rank 0 times
    the peak while the others wait, and every rank logs the same figure."""
    got = dist_pool.run(3, "test_metrics:_peak_on_ranks", timeout=120)
    assert got[0]["peak"] > 0 and all(r == {"peak": got[0]["peak"], "cached": got[0]["peak"]} for r in got), got
