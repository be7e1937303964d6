"""`trident train --nproc N` under faults a scheduler causes: a rank killed (-9) and a
requested stop (SIGTERM to the launcher, as SLURM's preemption sends).

One job goes through both, then is resumed, and its losses are compared bitwise with an
uninterrupted job of the same layout: a restart and a stop lose nothing and repeat nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from cli_helpers import CONFIG, TINY, trident

STEPS = ["train.steps=1000", "eval.interval=3", "checkpoint.interval=2"]  # never reached: the job is stopped
DEADLINE_S = 300


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _last_step(run: Path) -> int:
    return max((r["step"] for r in _records(run) if "loss" in r), default=0)


def _wait_for(what: str, ready, launcher: subprocess.Popen) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not ready():
        assert launcher.poll() is None, f"the job ended (exit {launcher.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _ranks(launcher: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(launcher.pid).children(recursive=True) if "trident" in " ".join(p.cmdline())]


def test_restart_after_kill_then_sigterm_stop_and_resume_are_exact(data_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    run = tmp_path / "run"
    common = ["--config", str(CONFIG), "--run-dir", str(run), "--nproc", "2", *TINY, *STEPS, f"data.work_dir={data_dir}"]
    launcher = subprocess.Popen([sys.executable, "-m", "trident", "train", "--max-restarts", "1", *common],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
    try:
        _wait_for("the first checkpoint", (run / "checkpoints" / "latest").exists, launcher)
        first = _ranks(launcher)
        victim = next(p for p in first if p.environ().get("RANK") == "1")
        killed_at = _last_step(run)
        victim.send_signal(signal.SIGKILL)
        # the restarted ranks have trained past the step where the old ones died
        _wait_for("steps after the restart", lambda: _last_step(run) >= killed_at + 2, launcher)
        assert not {p.pid for p in first} & {p.pid for p in _ranks(launcher)}
        launcher.send_signal(signal.SIGTERM)  # to the launcher alone: it forwards the stop to the ranks
        out, err = launcher.communicate(timeout=DEADLINE_S)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.communicate()
    stopped = _last_step(run)
    latest = run / "checkpoints" / json.loads((run / "checkpoints" / "latest").read_text())["dir"]
    # the launcher's own lines; the surviving rank's "[rank0]: ... Connection closed by peer"
    # traceback, printed by the rank itself before the launcher restarts it, is not among them
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[rank")]
    assert launcher.returncode == 143, err[-4000:]
    assert len(lines) == 2 and "SignalException" not in err, err[-4000:]
    assert lines[0].startswith("trident train: rank 1 on host ")
    assert "died (exit -9, SIGKILL); restart 1/1 from step_" in lines[0]
    assert lines[1] == (f"trident train: stopped by SIGTERM; latest checkpoint {latest} "
                        "(exit 143; the same command resumes from it)")
    assert latest.name == f"step_{stopped:07d}" and f"done: {stopped} steps (signal)" in out

    # the same command resumes from the stop; stop it deterministically two steps later
    end = f"train.exit_interval={stopped + 2}"
    assert "resumed from" in trident("train", *common, end).stdout
    reference = tmp_path / "reference"
    trident("train", *[a if a != str(run) else str(reference) for a in common], end)
    got, want = _records(run), _records(reference)
    keys = [(r["step"], "val_loss" in r) for r in got]
    assert len(keys) == len(set(keys)), "a step has two records of one kind"
    assert [(r["step"], r["loss"]) for r in got if "loss" in r] == [(r["step"], r["loss"]) for r in want if "loss" in r]
    assert [(r["step"], r["val_loss"]) for r in got if "val_loss" in r] == \
        [(r["step"], r["val_loss"]) for r in want if "val_loss" in r]
    assert _last_step(run) == stopped + 2


def test_metrics_of_a_step_are_never_written_twice(tmp_path):
    """A resume truncates later records, and does not repeat the kept records of its own step
    (a run resumed at its last step validates once more)."""
    from trident.training.metrics import MetricsWriter, read_metrics

    first = MetricsWriter(tmp_path, enabled=True)
    for step in (1, 2, 3):
        first.write({"step": step, "loss": float(step)})
    first.write({"step": 2, "val_loss": 0.5})
    resumed = MetricsWriter(tmp_path, enabled=True, start_step=2)  # the checkpoint was at step 2
    resumed.write({"step": 2, "val_loss": 0.5})  # validated again at the resumed step: kept once
    resumed.write({"step": 3, "loss": 3.5})
    assert [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(tmp_path)] == \
        [(1, 1.0, None), (2, 2.0, None), (2, None, 0.5), (3, 3.5, None)]


@pytest.mark.parametrize("code, text", [(-9, "exit -9, SIGKILL"), (1, "exit 1")])
def test_exit_text(code, text):
    from trident.tools.launch import exit_text

    assert exit_text(code) == text


def test_a_restart_after_a_stall_names_the_stall_once(tmp_path, capsys):
    """The watchdog's sentence of the attempt being restarted is printed before its restart
    line and removed, so a later attempt that fails otherwise is not blamed on the stall."""
    import logging

    from trident.tools.launch import AGENT_LOGGER, ELASTIC_LOGGER, _AgentEvents
    from trident.training.watchdog import STALL_FILE

    events = _AgentEvents("train", None)
    events.stall = tmp_path / STALL_FILE
    events.stall.write_text("rank 1 on host h (pid 7) stalled for 5 s at step 3 in phase 'forward mb 0': ...")

    def record(name: str, msg: str, args: tuple) -> logging.LogRecord:
        return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, None)

    events.filter(record(ELASTIC_LOGGER, "failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s", (1, 1, 7, "py")))
    events.filter(record(AGENT_LOGGER, "[%s] Worker group %s. %s/%s attempts left; will restart worker group",
                         ("default", "FAILED", 1, 1)))
    err = capsys.readouterr().err.splitlines()
    assert err == ["trident train: error: rank 1 on host h (pid 7) stalled for 5 s at step 3 in phase 'forward mb 0': ...",
                   f"trident train: rank 1 on host {__import__('socket').gethostname()} died (exit 1); restart 1/1 "
                   f"from the start (no checkpoint yet)"]
    assert not events.stall.exists()
