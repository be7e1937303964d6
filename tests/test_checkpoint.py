"""Checkpoints: exact resume, resume at another layout, corruption, crash safety (a rank
killed mid-run and restarted: test_launcher_signals.py).

All through `trident train` on the stdlib corpus with the tiny config of test_train_cli.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_helpers import CONFIG, TINY, losses, trident

STEPS = ["train.steps=8", "eval.interval=2"]


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted")
    trident("train", "--config", str(CONFIG), "--run-dir", str(run), *TINY, *STEPS, f"data.work_dir={data_dir}")
    return run


def _interrupted_at_4(data_dir: Path, run: Path, *layout: str) -> None:
    """Train to step 4 of 8 (checkpoints at 2 and 4), then stop as a job split would."""
    trident("train", "--config", str(CONFIG), "--run-dir", str(run), *layout, *TINY, *STEPS, "train.exit_interval=4",
            "checkpoint.interval=2", f"data.work_dir={data_dir}")


def test_resume_is_bitwise_identical(data_dir, uninterrupted, tmp_path):
    _interrupted_at_4(data_dir, tmp_path)
    first = losses(tmp_path)
    trident("train", "--config", str(CONFIG), "--run-dir", str(tmp_path), "--resume", *TINY, *STEPS, f"data.work_dir={data_dir}")
    assert first + losses(tmp_path)[4:] == losses(uninterrupted)  # exact float equality, data order included
    assert len(losses(tmp_path)) == 8
    # every evaluation reads the same validation samples, so a resumed run's val_loss is the uninterrupted one's
    assert _val_losses(tmp_path) == _val_losses(uninterrupted) and len(_val_losses(tmp_path)) == 4


def _val_losses(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]


def _layout_args(tp: int, pp: int, dp: int, zero: int) -> list[str]:
    world = tp * pp * dp
    return (["--nproc", str(world)] if world > 1 else []) + ["--tp", str(tp), "--pp", str(pp), f"optim.zero={zero}"]


# each hop trains two steps at its layout and stops; the next resumes there at another
# layout: every move is a reshard of model and optimizer state (merging 8 ranks' ZeRO-2
# shards into 2 pipeline stages, splitting one process's state over tp, pp and dp, ...)
HOPS = [(1, 1, 1, 0), (2, 2, 2, 2), (1, 2, 1, 0), (2, 1, 2, 1)]


def test_resume_at_another_layout_and_zero_stage(data_dir, uninterrupted, tmp_path):
    """111 -> 222 ZeRO-2 -> 121 -> 212 ZeRO-1, two steps each: the losses of one
    uninterrupted process, and each checkpoint records the layout that wrote it."""
    for hop, layout in enumerate(HOPS):
        proc = trident("train", "--config", str(CONFIG), "--run-dir", str(tmp_path), *(["--resume"] if hop else []),
                       *_layout_args(*layout), *TINY, *STEPS, "train.exit_interval=2", "checkpoint.interval=2",
                       f"data.work_dir={data_dir}")
        if hop:
            assert "resharded" in proc.stdout, proc.stdout
        step = 2 * (hop + 1)
        meta = json.loads((tmp_path / "checkpoints" / f"step_{step:07d}" / "meta.json").read_text())
        tp, pp, dp, zero = layout
        assert meta["layout"] == {"tp": tp, "pp": pp, "dp": dp, "world": tp * pp * dp, "zero": zero}, (hop, meta)
    got, ref = losses(tmp_path), losses(uninterrupted)
    assert len(got) == 8
    for step, (a, b) in enumerate(zip(got, ref), start=1):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: {a} vs uninterrupted {b}"


def test_corrupt_latest_falls_back_to_the_previous_checkpoint(data_dir, uninterrupted, tmp_path):
    _interrupted_at_4(data_dir, tmp_path)
    ckpts = tmp_path / "checkpoints"
    victim = ckpts / "step_0000004" / "model_pp0_tp0.safetensors"
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0xFF  # flip bits in a tensor
    victim.write_bytes(bytes(data))
    inspect = trident("checkpoint", "inspect", str(ckpts / "step_0000004"), check=False)
    assert inspect.returncode == 2
    assert f"checkpoint file '{victim}' fails its sha256 check" in inspect.stderr
    proc = trident("train", "--config", str(CONFIG), "--run-dir", str(tmp_path), *TINY, *STEPS, f"data.work_dir={data_dir}")
    assert "step_0000004 is unusable" in proc.stdout and "falling back" in proc.stdout
    assert "resumed from" in proc.stdout and "step_0000002 at step 2" in proc.stdout
    # steps 3-4 were re-run from the step-2 checkpoint, and the run ends where it should;
    # their first records were dropped: one record per step, the uninterrupted run's losses
    assert losses(tmp_path) == losses(uninterrupted)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    kinds = [(r.get("step"), tuple(sorted(r))) for r in records]
    assert len(kinds) == len(set(kinds)), kinds  # no record of a step twice
    assert [r.get("step", 0) for r in records] == sorted(r.get("step", 0) for r in records)


def test_crash_while_saving_leaves_latest_complete(data_dir, tmp_path):
    _interrupted_at_4(data_dir, tmp_path)
    ckpts = tmp_path / "checkpoints"
    # a crash mid-save leaves a partial step_N.tmp folder and latest untouched
    partial = ckpts / "step_0000006.tmp"
    partial.mkdir()
    (partial / "model_pp0_tp0.safetensors").write_bytes(b"half")
    assert json.loads((ckpts / "latest").read_text())["step"] == 4
    out = trident("checkpoint", "inspect", str(ckpts)).stdout
    assert "step 4, consumed samples 32" in out and "sha256 verified" in out
    assert "embedding.weight" in out and "layers.1.mlp.fc.gate.weight" in out
    # the next run resumes from step 4 and a later save clears the stale folder
    trident("train", "--config", str(CONFIG), "--run-dir", str(tmp_path), *TINY, *STEPS, "train.steps=6",
            "checkpoint.interval=0", f"data.work_dir={data_dir}")
    assert json.loads((ckpts / "latest").read_text())["step"] == 6 and not partial.exists()
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000004", "step_0000006"]
