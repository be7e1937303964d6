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

A requested stop (SIGTERM from a scheduler, Ctrl-C) reaches torch's agent, which forwards
it to the ranks; they stop at a step edge and save a checkpoint. The launcher then prints
one line naming that checkpoint and exits 128 + the signal's number (143 for SIGTERM, 130
for SIGINT), the shell's convention for "stopped on request", so a SLURM script can tell a
preemption to requeue from a crash; a single-process `trident train` does the same. When
a rank dies and `--max-restarts` allows, the launcher prints one line per restart naming
the rank, its exit and the checkpoint the job restarts from.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import uuid
from pathlib import Path

ERROR_DIR_ENV = "TRIDENT_RANK_ERROR_DIR"  # set by launch_local for its ranks
ELASTIC_LOGGER = "torch.distributed.elastic.multiprocessing.api"  # "failed (exitcode...)", "closing signal"
AGENT_LOGGER = "torch.distributed.elastic.agent.server.api"  # "... attempts left; will restart", "death signal"


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


def latest_checkpoint(checkpoints: Path | None) -> Path | None:
    """The checkpoint folder that `checkpoints/latest` names, or None (none saved yet)."""
    try:
        return checkpoints / json.loads((checkpoints / "latest").read_text())["dir"]  # type: ignore[operator]
    except (TypeError, OSError, ValueError, KeyError):
        return None


def stop_line(command: str, signum: int, checkpoints: Path | None) -> str:
    """The one line of a requested stop; its exit status is `128 + signum`."""
    latest = latest_checkpoint(checkpoints)
    saved = f"latest checkpoint {latest}" if latest is not None else f"no checkpoint in {checkpoints}"
    return (f"trident {command}: stopped by {signal.Signals(signum).name}; {saved} "
            f"(exit {128 + signum}; the same command resumes from it)")


def exit_text(code: int) -> str:
    """-9 -> 'exit -9, SIGKILL': a negative exit is the signal that ended the process."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"exit {code}, {signal.Signals(-code).name}"
    return f"exit {code}"


class _AgentEvents(logging.Filter):
    """Turns torch's agent log records into trident's lines, and keeps its own from printing.

    The agent says which worker failed (ERROR, multiprocessing logger) and that it will
    restart the group (INFO, agent logger) in separate records: the first is remembered,
    the second prints "rank r on host h died (exit -9, SIGKILL); restart 1/2 from step_N".
    Its warnings that trident's own lines replace (the death signal, closing signals) are
    dropped; any other warning passes through."""

    def __init__(self, command: str, checkpoints: Path | None) -> None:
        super().__init__()
        self.command, self.checkpoints = command, checkpoints
        self.failure: tuple[int, int] | None = None  # (exit code, rank) of the last failure
        self.restarts = 0
        self.stall: Path | None = None  # the watchdog's report of the attempt being restarted

    def filter(self, record: logging.LogRecord) -> bool:
        msg, args = str(record.msg), record.args if isinstance(record.args, tuple) else ()
        if msg.startswith("failed (exitcode") and len(args) >= 2:
            self.failure = (int(args[0]), int(args[1]))  # one node: the local rank is the rank
        elif "attempts left" in msg and len(args) >= 4:
            self.restarts += 1
            if self.stall is not None and self.stall.exists():  # said now: a later attempt's failure is its own
                print(f"trident {self.command}: error: {self.stall.read_text().strip()}", file=sys.stderr, flush=True)
                self.stall.unlink()
            print(self.restart_line(int(args[3])), file=sys.stderr, flush=True)
        return record.name == AGENT_LOGGER and record.levelno >= logging.WARNING and "death signal" not in msg

    def restart_line(self, max_restarts: int) -> str:
        code, rank = self.failure if self.failure is not None else (0, -1)
        who = f"rank {rank} on host {socket.gethostname()} died ({exit_text(code)})" if rank >= 0 else "a rank failed"
        latest = latest_checkpoint(self.checkpoints)
        where = latest.name if latest is not None else "the start (no checkpoint yet)"
        return f"trident {self.command}: {who}; restart {self.restarts}/{max_restarts} from {where}"


def launch_local(nproc: int, argv: list[str], max_restarts: int = 0, checkpoints: Path | None = None) -> int:
    """Run ``python -m trident *argv`` as `nproc` ranks on this machine: 0 if all succeeded,
    2 if every failed rank reported a user error (as a single process would), 128 + signal
    after a requested stop (SIGTERM, Ctrl-C; `checkpoints` is where to find the checkpoint
    it saved), else 1."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from trident.training.watchdog import STALL_FILE

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
    # the agent's per-rank failure lines repeat the summary below; its restarts become one line each
    events = _AgentEvents(argv[0], checkpoints)
    loggers = [logging.getLogger(name) for name in (ELASTIC_LOGGER, AGENT_LOGGER)]
    levels = [log.level for log in loggers]
    with tempfile.TemporaryDirectory(prefix="trident-ranks-") as folder:
        os.environ[ERROR_DIR_ENV] = folder  # the ranks inherit it
        events.stall = Path(folder) / STALL_FILE
        for log, level in zip(loggers, (logging.ERROR, logging.INFO)):
            log.setLevel(level)
            log.addFilter(events)
        try:
            elastic_launch(config, entrypoint=sys.executable)("-m", "trident", *argv)
        except ChildFailedError as err:
            stall = Path(folder) / STALL_FILE  # the watchdog named a stalled rank: that explains every exit
            if stall.exists():
                print(f"trident {argv[0]}: error: {stall.read_text().strip()}", file=sys.stderr, flush=True)
                return 1
            exits = {rank: f.exitcode for rank, f in err.failures.items()}
            messages = _read_messages(Path(folder))
            print("\n".join(failure_lines(argv[0], exits, messages)), file=sys.stderr, flush=True)
            return 2 if messages and set(exits) <= set(messages) else 1
        except SignalException as err:  # the ranks were sent the same signal and have stopped
            print(stop_line(argv[0], int(err.sigval), checkpoints), file=sys.stderr, flush=True)
            return 128 + int(err.sigval)
        finally:
            for log, level in zip(loggers, levels):
                log.setLevel(level)
                log.removeFilter(events)
            os.environ.pop(ERROR_DIR_ENV, None)
    return 0
