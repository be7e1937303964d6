"""Run a function on N gloo ranks on this machine, with a hard timeout.

Starting a process that imports torch costs seconds here, so ranks are long-lived
workers (`_worker.py`) reused by every test; each task still gets a fresh process group
(a new file-store rendezvous in a temporary directory). If any rank raises, or the task
runs past its timeout (a hang), the test fails with every rank's traceback -- for a hung
rank, the stack where it waits -- and the workers are killed and replaced, so no stray
process survives and the next test starts clean.

Tasks and results cross the process boundary as JSON: functions are named
``"module:function"`` (modules in tests/ are importable) and return JSON-able values.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = Path(__file__).with_name("_worker.py")
# gloo leaves each process group's threads behind after destroy_process_group (48 per
# 2-rank ZeRO task here), and they poll while idle: a worker past this many threads is
# replaced before its next task (one torch import), or the idle pool would eat the cores
# that later tests, the command-line ones above all, need
MAX_THREADS = 256


class DistributedTestError(AssertionError):
    """A rank failed or the task hung; the message holds every rank's traceback."""


class _Worker:
    def __init__(self, index: int, log_dir: Path) -> None:
        self.log_path = log_dir / f"rank{index}.log"
        self.log = open(self.log_path, "w+")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            bufsize=1,
            env=env,
        )
        self._offset = 0

    def send(self, task: dict) -> None:
        self._offset = os.path.getsize(self.log_path)
        self.proc.stdin.write(json.dumps(task) + "\n")
        self.proc.stdin.flush()

    def log_since_task(self) -> str:
        with open(self.log_path) as f:
            f.seek(self._offset)
            return f.read()[-20000:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def threads(self) -> int:
        """Threads the worker holds now (0 where /proc cannot say)."""
        try:
            return len(os.listdir(f"/proc/{self.proc.pid}/task"))
        except OSError:
            return 0

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()
        self.log.close()


class WorkerPool:
    """Long-lived rank processes, started on first need and replaced after a failure."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="trident-dist-")
        self.dir = Path(self._tmp.name)
        self.workers: list[_Worker] = []
        self._tasks = 0

    def _ensure(self, n: int) -> None:
        if not all(w.alive() for w in self.workers):
            self.workers = self._reset()
        for i, w in enumerate(self.workers):
            if w.threads() > MAX_THREADS:
                w.kill()
                self.workers[i] = _Worker(i, self.dir)
        while len(self.workers) < n:
            self.workers.append(_Worker(len(self.workers), self.dir))

    def _reset(self) -> list[_Worker]:
        for w in self.workers:
            w.kill()
        return []

    def run(self, world: int, fn: str, timeout: float = 180.0, **kwargs: object) -> list[object]:
        """Run ``fn(**kwargs)`` on `world` ranks; return each rank's result, rank order."""
        self._ensure(world)
        self._tasks += 1
        store = self.dir / f"store{self._tasks}"
        ranks = self.workers[:world]
        for rank, w in enumerate(ranks):
            w.send({"fn": fn, "kwargs": kwargs, "rank": rank, "world": world, "store": str(store), "timeout": timeout})

        replies: dict[int, dict] = {}
        sel = selectors.DefaultSelector()
        for rank, w in enumerate(ranks):
            sel.register(w.proc.stdout, selectors.EVENT_READ, rank)
        deadline = time.monotonic() + timeout
        first_failure: float | None = None
        try:
            while len(replies) < world:
                now = time.monotonic()
                # once one rank has failed, the others get a short grace to fail too,
                # then they are presumed stuck in a collective with the failed rank
                limit = deadline if first_failure is None else min(deadline, first_failure + 5.0)
                if now >= limit:
                    break
                for key, _ in sel.select(timeout=min(1.0, limit - now)):
                    rank = key.data
                    line = ranks[rank].proc.stdout.readline()
                    sel.unregister(key.fileobj)
                    if not line:  # the worker died: its log says why
                        ranks[rank].proc.wait()
                        code = ranks[rank].proc.returncode
                        replies[rank] = {
                            "ok": False,
                            "error": f"worker process exited with code {code}; its log:\n{ranks[rank].log_since_task()}",
                        }
                    else:
                        replies[rank] = json.loads(line)
                    if not replies[rank]["ok"] and first_failure is None:
                        first_failure = time.monotonic()
        finally:
            sel.close()

        if len(replies) == world and all(r["ok"] for r in replies.values()):
            return [replies[r]["result"] for r in range(world)]

        # failure or hang: collect stacks of the stuck ranks, then replace every worker
        hung = [r for r in range(world) if r not in replies]
        for r in hung:
            if ranks[r].alive():
                ranks[r].proc.send_signal(signal.SIGUSR1)
        time.sleep(1.0 if hung else 0.0)
        report = []
        for r in range(world):
            if r in replies and replies[r]["ok"]:
                report.append(f"=== rank {r}: ok")
            elif r in replies:
                report.append(f"=== rank {r}: raised\n{replies[r]['error']}")
            else:
                report.append(f"=== rank {r}: did not finish (hung); its stacks and log:\n{ranks[r].log_since_task()}")
        self.workers = self._reset()
        reason = "timed out after %.0f s" % timeout if hung and first_failure is None else "failed"
        raise DistributedTestError(f"distributed task {fn} on {world} ranks {reason}\n" + "\n".join(report))

    def close(self) -> None:
        for w in self.workers:
            if w.alive():
                try:
                    w.proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                    w.proc.stdin.flush()
                    w.proc.wait(timeout=5)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            w.kill()
        self.workers = []
        self._tmp.cleanup()
