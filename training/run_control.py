"""Starting and stopping one rank's run: joining the job, signals, the summary.

Kept apart from the loop (`trident.training.trainer`) because none of it is the step:
the layout is checked before any process group exists, and a signal only sets a flag
that the loop reads at a step edge (all-reduced, so every rank stops at the same step).
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trident.errors import UserError
from trident.parallel.pipeline.stages import stage_layers
from trident.parallel.topology import Topology
from trident.training.config import Config, derive


class NonFiniteLossError(UserError):
    """The global loss or gradient became inf/NaN in fp32/bf16 and the config says to stop.

    A `UserError`: every rank raises it together (the loss and the norm are global), and
    the command ends with its one sentence (which step, what to change), not a traceback."""


@dataclass
class TrainSummary:
    steps: int
    final_loss: float | None
    val_loss: float | None
    stopped_by: str
    run_dir: str
    losses: list[float] = field(default_factory=list)
    signal: str | None = None  # the signal this process received (SIGTERM, SIGINT), if any


class StopSignal:
    """Remembers SIGTERM/SIGINT instead of dying mid-step; the loop stops at a step edge."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def launched() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def make_topology(cfg: Config) -> Topology:
    """Check everything that can be checked without processes, then join the job."""
    world = int(os.environ["WORLD_SIZE"]) if launched() else 1
    derive(cfg, world)
    stage_layers(cfg.model.n_layers, cfg.parallel.pp, cfg.parallel.pp_split)
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is 'cuda' but no CUDA device is available; use train.device=cpu")
    if not launched():
        return Topology.single(cfg.train.device)
    p = cfg.parallel
    return Topology.from_env(tp=p.tp, pp=p.pp, dp=p.dp, cp=p.cp, device=cfg.train.device, timeout_s=p.timeout_s,
                             ep=p.ep)


def write_resolved_config(run_dir: Path, cfg: Config, derived: dict[str, Any]) -> str:
    """RUN_DIR/config.json: the config as run, with what follows from it (written whole,
    then renamed, so a reader never sees half a file). Returns the JSON text, which is
    printed only on request (`--print-config`): a start-of-run summary replaces the echo."""
    run_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps({**cfg.to_dict(), "derived": derived}, indent=2)
    tmp = run_dir / "config.json.tmp"
    tmp.write_text(text + "\n")
    os.replace(tmp, run_dir / "config.json")
    return text
