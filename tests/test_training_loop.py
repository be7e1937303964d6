"""The training loop through `trident train`: early stopping on the validation loss, the
TensorBoard mirror of the metrics file, and what a non-finite step does."""

from __future__ import annotations

import json

import pytest

from cli_helpers import CONFIG, TINY, trident

def test_early_stopping_on_a_validation_loss_that_does_not_improve(data_dir, tmp_path):
    # lr 1e-12 leaves the fp32 weights (all but) unchanged: the validation loss stops improving
    proc = trident("train", "--config", str(CONFIG), "--run-dir", str(tmp_path), *TINY, "train.steps=10",
                   "optim.lr=1e-12", "optim.min_lr=0", "eval.interval=2", "eval.patience=2", "checkpoint.interval=-1",
                   f"data.work_dir={data_dir}")
    vals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    vals = [(r["step"], r["val_loss"]) for r in vals if "val_loss" in r]
    # the rule: stop at the evaluation that makes `patience` in a row without a new best
    best, bad, expected = float("inf"), 0, None
    for step, val in vals:
        best, bad = (val, 0) if val < best else (best, bad + 1)
        if bad >= 2:
            expected = step
            break
    assert expected is not None and expected < 10, vals
    assert f"done: {expected} steps (early_stopping)" in proc.stdout
    assert vals[-1][0] == expected  # no evaluation after the stop, and no extra final one


def test_tensorboard_events_mirror_the_metrics_file(data_dir, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                            reason="the tensorboard extra is not installed")
    trident("train", "--config", str(CONFIG), "--run-dir", str(tmp_path), *TINY, "train.steps=3",
            "log.tensorboard=true", "checkpoint.interval=-1", f"data.work_dir={data_dir}")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    logged = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert logged == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records if "loss" in r]
    assert {"lr", "grad_norm", "tokens_per_s", "mfu", "val_loss"} <= set(acc.Tags()["scalars"])


def test_a_non_finite_step_stops_with_its_number_or_is_skipped(data_dir, tmp_path):
    # weights drawn with std 1e38 include infinities (past fp32's 3.4e38): a NaN loss at the first step, deterministically
    args = ["train", "--config", str(CONFIG), *TINY, "train.steps=3", "checkpoint.interval=-1", "model.init_std=1e38",
            f"data.work_dir={data_dir}"]
    proc = trident(*args, "--run-dir", str(tmp_path / "stop"), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "trident train: error: step 1: the loss is" in proc.stderr and "train.nonfinite=skip" in proc.stderr
    assert "Traceback" not in proc.stderr
    trident(*args, "--run-dir", str(tmp_path / "skip"), "train.nonfinite=skip")
    records = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["stepped"] for r in steps] == [False, False, False]
    assert len({r["lr"] for r in steps}) == 1  # a skipped step does not advance the schedule
