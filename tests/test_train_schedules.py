"""`trident train` under the interleaved and ZB-H1 schedules, and a checkpoint saved under
one schedule resumed under another: every run logs the losses of one process.

The tiny config of test_train_cli with 4 layers (pp=2 x vpp=2 needs four), 6 steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_helpers import CONFIG, TINY, losses, trident

STEPS = ["model.n_layers=4", "train.steps=6"]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("sched-ref")
    trident("train", "--config", str(CONFIG), "--run-dir", str(run), *TINY, *STEPS, f"data.work_dir={data_dir}")
    return run


def _same(got: list[float], ref: list[float], what: str) -> None:
    assert len(got) == len(ref) == 6, (what, got)
    for step, (a, b) in enumerate(zip(got, ref), start=1):
        assert abs(a - b) <= 1e-5 * abs(b), f"{what}, step {step}: loss {a} vs {b} in one process"


@pytest.mark.parametrize(
    "nproc, layout, schedule",
    [(2, ["--pp", "2"], ["parallel.pp_schedule=interleaved", "parallel.vpp=2", "log.timeline=true"]),
     (4, ["--tp", "2", "--pp", "2"], ["parallel.pp_schedule=zb-h1", "parallel.sequence_parallel=true"])],
    ids=["interleaved-pp2-vpp2", "zbh1-tp2-pp2-sp"],
)
def test_schedule_trains_like_one_process(reference, data_dir, tmp_path, nproc, layout, schedule):
    proc = trident("train", "--config", str(CONFIG), "--nproc", str(nproc), *layout, "--run-dir", str(tmp_path),
                   *TINY, *STEPS, *schedule, f"data.work_dir={data_dir}")
    _same(losses(tmp_path), losses(reference), " ".join(schedule))
    if "log.timeline=true" in schedule:  # chunk steps are on the timeline: F and B of both chunks
        events = [e for e in json.loads((tmp_path / "timeline.json").read_text())["traceEvents"] if e["ph"] == "X"]
        names = {e["name"] for e in events if e["tid"] == 0 and e["cat"] == "forward"}
        assert {"F0", "F0.1", "F3", "F3.1"} <= names, sorted(names)
        assert "interleaved" in proc.stdout


def test_checkpoint_resumes_under_another_schedule(reference, data_dir, tmp_path):
    common = ["--config", str(CONFIG), "--nproc", "2", "--pp", "2", "--run-dir", str(tmp_path), *TINY, *STEPS,
              f"data.work_dir={data_dir}"]
    trident("train", *common, "parallel.pp_schedule=interleaved", "parallel.vpp=2", "train.exit_interval=4",
            "checkpoint.interval=2")
    proc = trident("train", *common, "parallel.pp_schedule=zb-h1")
    assert "resumed from" in proc.stdout
    _same(losses(tmp_path), losses(reference), "interleaved to step 4, then zb-h1")


def test_a_layout_the_schedule_cannot_run_is_one_sentence(data_dir, tmp_path):
    proc = trident("train", "--config", str(CONFIG), "--nproc", "2", "--pp", "2", "--run-dir", str(tmp_path), *TINY,
                   *STEPS, "parallel.pp_schedule=interleaved", "parallel.vpp=2", "train.global_batch_size=6",
                   f"data.work_dir={data_dir}", check=False)
    assert proc.returncode != 0
    assert "groups of pp=2, but there are 3 per step" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
