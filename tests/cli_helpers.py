"""Running `trident` as a user would, for the end-to-end tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "demo.yaml"
TINY = [
    "model.n_layers=2", "model.hidden=64", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=128",
    "model.max_seq_len=32", "data.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=8",
    "eval.iters=1", "eval.interval=5", "log.interval=1", "checkpoint.interval=-1", "optim.warmup_steps=2",
    "data.vocab_size=512", "model.vocab_size=512",
]
TIMEOUT = 420


def trident(*args: str, timeout: float = TIMEOUT, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, "-m", "trident", *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"trident {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def records(run_dir: Path, key: str) -> list:
    """Every value of `key` in the run's metrics.jsonl, in order."""
    return [r[key] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if key in r]


def assert_same_losses(run: Path, ref: Path, what: str, tol: float = 1e-5) -> None:
    """The training and validation losses of `run` equal the single-process `ref` run's."""
    for key in ("loss", "val_loss"):
        got, want = records(run, key), records(ref, key)
        assert len(got) == len(want) > 0, (what, key, got)
        for a, b in zip(got, want):
            assert abs(a - b) <= tol * abs(b), f"{what}: {key} {got} vs {want} in one process"
