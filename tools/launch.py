"""Start N local ranks of a trident command through torch's own elastic launcher.

`trident <command> --nproc N ...` outside torchrun re-runs the same command line as N
ranks (``python -m trident <command> ...``) with torchrun's environment, exactly as
``torchrun --standalone --nproc-per-node N -m trident <command> ...`` would. The entry
point is the interpreter, not a Python function, so nothing is pickled across processes.

A user error (a missing dataset, a bad path) is usually raised by every rank alike; printed
by each it would appear N times, followed by the launcher's own lines. So a rank started
here leaves its one sentence in a file instead (`report_rank_error`), and the launcher
prints each distinct sentence once with the ranks that reported it -- errors that differ
between ranks all still show.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import uuid
from pathlib import Path

ERROR_DIR_ENV = "TRIDENT_RANK_ERROR_DIR"  # set by launch_local for its ranks
ELASTIC_LOGGER = "torch.distributed.elastic.multiprocessing.api"  # "failed (exitcode...)", "closing signal"


def under_launcher() -> bool:
    """True inside a rank started by torchrun (or by `launch_local`)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def report_rank_error(err: Exception) -> bool:
    """In a rank of `launch_local`: leave the error's sentence for the launcher to print.

    False elsewhere (a plain run, or a rank of an outside torchrun): the caller prints it."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder or not under_launcher() or not os.path.isdir(folder):
        return False
    path = Path(folder) / f"rank-{int(os.environ['RANK'])}.txt"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(err))
    os.replace(tmp, path)  # the launcher never reads half a sentence
    return True


def rank_ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '(ranks 0-2, 5)'; [3] -> '(rank 3)'."""
    ranks = sorted(set(ranks))
    runs: list[list[int]] = []
    for r in ranks:
        if runs and r == runs[-1][-1] + 1:
            runs[-1].append(r)
        else:
            runs.append([r])
    text = ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)
    return f"(rank{'s' if len(ranks) > 1 else ''} {text})"


def _with_ranks(message: str, ranks: list[int]) -> str:
    """'the file is missing.' -> 'the file is missing (ranks 0-1).': the sentence keeps its end."""
    if message.endswith("."):
        return f"{message[:-1]} {rank_ranges(ranks)}."
    return f"{message} {rank_ranges(ranks)}"


def failure_lines(command: str, exits: dict[int, int], messages: dict[int, str]) -> list[str]:
    """What the launcher prints when ranks failed: each distinct error sentence once, with
    the ranks that raised it; then the ranks that failed without one (a crash, a signal),
    which have printed their own output."""
    by_message: dict[str, list[int]] = {}
    for rank, message in sorted(messages.items()):
        by_message.setdefault(message, []).append(rank)
    lines = [f"trident {command}: error: {_with_ranks(message, ranks)}" for message, ranks in by_message.items()]
    others = [r for r in sorted(exits) if r not in messages]
    if others:
        lines.append("trident: " + ", ".join(f"rank {r} (exit {exits[r]})" for r in others) + " failed")
    return lines


def _read_messages(folder: Path) -> dict[int, str]:
    return {int(f.stem.removeprefix("rank-")): f.read_text().strip() for f in folder.glob("rank-*.txt")}


def launch_local(nproc: int, argv: list[str], max_restarts: int = 0) -> int:
    """Run ``python -m trident *argv`` as `nproc` ranks on this machine: 0 if all succeeded,
    2 if every failed rank reported a user error (as a single process would), else 1."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"trident-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port, as torchrun --standalone
        max_restarts=max_restarts,
        monitor_interval=0.2,
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # N ranks share the cores
    elastic_log = logging.getLogger(ELASTIC_LOGGER)
    level = elastic_log.level
    with tempfile.TemporaryDirectory(prefix="trident-ranks-") as folder:
        os.environ[ERROR_DIR_ENV] = folder  # the ranks inherit it
        elastic_log.setLevel(logging.CRITICAL)  # its per-rank failure lines repeat the summary below
        try:
            elastic_launch(config, entrypoint=sys.executable)("-m", "trident", *argv)
        except ChildFailedError as err:
            exits = {rank: f.exitcode for rank, f in err.failures.items()}
            messages = _read_messages(Path(folder))
            print("\n".join(failure_lines(argv[0], exits, messages)), file=sys.stderr, flush=True)
            return 2 if messages and set(exits) <= set(messages) else 1
        finally:
            elastic_log.setLevel(level)
            os.environ.pop(ERROR_DIR_ENV, None)
    return 0
