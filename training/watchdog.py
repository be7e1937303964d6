"""The stall watchdog: a job whose rank stopped making progress ends with one sentence naming it.

Without it a stalled rank (SIGSTOP, a hung collective, a dead NIC) ends the job only at
the collective timeout (`parallel.timeout_s`), with a gloo traceback from every healthy
rank and no word of which rank it was. With it, each rank runs one daemon thread that
every few seconds

1. publishes this rank's heartbeat (`trident.parallel.heartbeat`) to the rendezvous store;
2. reads the heartbeats of a bounded set of peers, `watched_ranks`: its ring neighbours
   in tp, cp, dp and pp (at most 8, whatever the world). Every rank is the neighbour of
   some other, so every rank is watched, and the store serves O(1) small requests per
   rank per interval -- no rank reads O(world) keys, and no host-level helper process
   is needed (a watcher on one local rank per host would go quiet with that rank);
3. judges them (`judge`, a pure function): a peer is stalled when it has published
   nothing for `parallel.stall_timeout_s` (stopped, dead, cut off), or when a rank it
   sees -- itself included -- has stayed in one phase that long (hung). Ages are
   measured on the reader's clock, never by comparing two hosts' clocks;
4. on a stall, claims the report with one ``compare_set`` in the store, so exactly one
   rank says the sentence, leaves it where the launcher prints it (`leave_sentence`)
   and ends its process with ``os._exit(1)`` -- the main thread is stuck in a
   collective and cannot unwind. Every other rank's watcher sees the claim and exits
   quietly with status 1 as well, and a rank whose collective fails because a peer
   left checks the claim before printing a traceback (`Watchdog.exit_if_reported`).
   A failure status lets torchrun's ``--max-restarts`` restart the job.

Who is named. A rank that stopped publishing is named first: its peers wait for it.
When every rank is alive, a rank busy with its own work (not in a phase that waits on
peers: `Heartbeat.waiting`) for over half the limit is named -- its peers wait for it;
when all in view wait on peers, the longest waiter is named only at 1.5 times the limit,
so that a rank which sees the real culprit names it first. Checkpoint save and resume are
`slow` phases (only the collective timeout ends them), and a process's first step is not
judged (compilation, lazy communicator set-up); a silent rank is named in any phase. The
watchdog starts once the trainer is built: set-up runs C code (tokenizer training on rank
0) that holds the GIL, which would starve the thread and look like silence.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from trident.parallel.heartbeat import Heartbeat, read_heartbeats
from trident.parallel.topology import Layout, Topology
from trident.training.config import Config

REPORT_KEY = "watchdog/report"  # "" until a rank claims it with "<rank>:<sentence>"
ERROR_DIR_ENV = "TRIDENT_RANK_ERROR_DIR"  # set by trident.tools.launch for its ranks (training may not import tools)
STALL_FILE = "stall.txt"  # in that folder: the launcher prints it instead of each rank's exit
TEST_STALL_ENV = "TRIDENT_TEST_STALL"  # "RANK:STEP:stop|hang:PHASE" -- a test makes a rank stall there


def watched_ranks(layout: Layout, rank: int) -> list[int]:
    """The previous and next rank of `rank` in each of its tp, cp, dp and pp groups (rings)."""
    pp, dp, tp = layout.coords(rank)
    at = {"pp": pp, "dp": dp, "tp": tp, "cp": layout.cp_of(rank)}
    peers: set[int] = set()
    for dim, size in (("tp", layout.tp), ("cp", layout.cp), ("dp", layout.dp), ("pp", layout.pp)):
        for step in (-1, 1):
            c = dict(at, **{dim: (at[dim] + step) % size})
            peers.add(layout.rank_of(c["pp"], c["dp"], c["tp"], c["cp"]))
    peers.discard(rank)
    return sorted(peers)


@dataclass
class Peer:
    """A rank as one watcher knows it: its last record and when (on the watcher's clock)
    that record was first seen; `seen_at` starts as the time watching began."""

    seen_at: float
    record: dict[str, Any] | None = None

    def observe(self, record: dict[str, Any], now: float) -> None:
        if self.record is None or record["seq"] != self.record["seq"]:
            self.record, self.seen_at = record, now

    def silent_s(self, now: float) -> float:
        return now - self.seen_at

    def stalled_s(self, now: float) -> float:
        """Time in its current phase: what it had measured when it published, plus since."""
        return (self.record["in_phase_s"] if self.record else 0.0) + self.silent_s(now)

    @property
    def done(self) -> bool:
        return bool(self.record and self.record["done"])


@dataclass(frozen=True)
class Stall:
    rank: int
    stalled_s: float
    silent_s: float | None  # None: it is alive (publishing) but has made no progress
    record: dict[str, Any] | None


def judge(peers: dict[int, Peer], now: float, limit: float) -> Stall | None:
    """Whether any of `peers` (the watcher itself included) has stalled, and which to name."""
    live = {r: p for r, p in peers.items() if not p.done}
    if not live:
        return None
    quiet = max(live, key=lambda r: (live[r].silent_s(now), -r))
    silent = live[quiet].silent_s(now)
    if silent > limit:
        return Stall(quiet, live[quiet].stalled_s(now), silent, live[quiet].record)
    stuck = any(p.record and p.record["armed"] and not p.record["slow"] and p.stalled_s(now) > limit
                for p in live.values())
    if not stuck:
        return None
    if silent > limit / 2:  # the ranks in a collective wait for the one that went quiet
        return Stall(quiet, live[quiet].stalled_s(now), silent, live[quiet].record)
    seen = {r: p for r, p in live.items() if p.record and not p.record["slow"]}
    # a rank busy with its own work (not waiting on peers) for over half the limit holds them up
    working = [r for r, p in seen.items() if not p.record["waiting"] and p.stalled_s(now) > limit / 2]
    if working:
        r = max(working, key=lambda r: (seen[r].stalled_s(now), -r))
        return Stall(r, seen[r].stalled_s(now), None, seen[r].record)
    # every rank in view waits on peers: the one holding them up is out of view (a rank that
    # sees it names it first), or all are in one hung collective: then name the longest waiter
    r = max(seen, key=lambda r: (seen[r].stalled_s(now), -r))
    return Stall(r, seen[r].stalled_s(now), None, seen[r].record) if seen[r].stalled_s(now) > 1.5 * limit else None


def stall_sentence(stall: Stall, limit: float) -> str:
    """The one sentence a stall ends the job with."""
    rec = stall.record
    if rec is None:
        who = f"rank {stall.rank} stalled before its first heartbeat:"
    else:
        who = (f"rank {stall.rank} on host {rec['host']} (pid {rec['pid']}) stalled for {stall.stalled_s:.0f} s "
               f"at step {rec['step']} in phase '{rec['phase']}':")
    if stall.silent_s is None and rec is not None and rec["waiting"]:
        why = "it is alive, waiting on peers that look alive too (a hung or mismatched collective)"
    elif stall.silent_s is None:
        why = "it is alive but has not finished that phase (a hang or deadlock in this rank's own work)"
    else:
        why = f"no heartbeat for {stall.silent_s:.0f} s (the process is stopped, dead or cut off from the network)"
    return (f"{who} {why}; the job stops with exit status 1 "
            f"(parallel.stall_timeout_s={limit:g}; raise it if this phase can take longer).")


def leave_sentence(sentence: str) -> None:
    """Put the sentence where the launcher shows it: `trident ... --nproc N` prints
    `STALL_FILE` once; under torchrun it goes to stderr and to torchrun's error file
    (its failure summary shows it as the root cause)."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if folder and os.path.isdir(folder):
        path = Path(folder) / STALL_FILE
        path.with_suffix(".tmp").write_text(sentence)
        os.replace(path.with_suffix(".tmp"), path)
    else:
        print(f"trident: error: {sentence}", file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        info = {"py_callstack": sentence, "timestamp": str(int(time.time()))}  # torchrun prints py_callstack
        Path(error_file).write_text(json.dumps({"message": {"message": sentence, "extraInfo": info}}))


def _exit(status: int = 1) -> None:
    """End the process now: the main thread may be stuck in a collective, out of reach."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


class Watchdog:
    """This rank's heartbeat publisher and stall watcher (one daemon thread).

    Disabled (every method a no-op) at ``parallel.stall_timeout_s=0``, in a world of one,
    or when the topology has no store (a process group made outside `Topology.from_env`)."""

    def __init__(self, topo: Topology, stall_timeout_s: float, interval_s: float | None = None) -> None:
        self.store: dist.Store | None = topo.store if stall_timeout_s > 0 and topo.world > 1 else None
        self.hb: Heartbeat = topo.heartbeat
        self.rank, self.host, self.pid = topo.rank, socket.gethostname(), os.getpid()
        self.limit = stall_timeout_s
        # a tenth of the limit (5 s at the default 120 s): a silent rank is seen well
        # before its waiting peers' own phases outlast the limit (`judge`)
        self.interval = interval_s if interval_s is not None else min(5.0, max(0.1, stall_timeout_s / 10))
        self.watched = watched_ranks(topo.layout, topo.rank) if self.store is not None else []
        self.peers: dict[int, Peer] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the test hook publishes from the main thread too
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.store is not None

    def start(self) -> "Watchdog":
        if not self.enabled:
            return self
        self.store.compare_set(REPORT_KEY, "", "")  # exists from now on (a claimed report is kept)
        self.publish()
        now = time.monotonic()
        self.peers = {r: Peer(seen_at=now) for r in self.watched}
        _install_test_stall(self)
        self._thread = threading.Thread(target=self._run, name="trident-watchdog", daemon=True)
        self._thread.start()
        return self

    def publish(self) -> None:
        with self._lock:
            self.hb.publish(self.store, self.rank, self.host, self.pid)

    def stop(self) -> None:
        """This rank is leaving `train` (finished or failed): say so, so its peers do not
        take its silence for a stall, and stop the thread."""
        if not self.enabled or self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=2 * self.interval + 1)
        self.hb.done = True
        try:
            self.publish()
        except Exception:  # the store's host has left already: nobody is watching
            pass

    def reported(self) -> bool:
        return self.enabled and bool(self.store.get(REPORT_KEY))

    def exit_if_reported(self) -> None:
        """After a collective failed on this rank: when a stall has been reported, the
        failure is its consequence -- exit 1 without adding a traceback to the sentence."""
        try:
            if self.reported():
                _exit(1)
        except Exception:  # no store to ask: let the original error speak
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.publish()
                if self.reported():
                    _exit(1)  # another rank said the sentence
                stall = self.check(time.monotonic())
            except Exception:  # the store is unreachable: the collective timeout stays the backstop
                continue
            if stall is not None:
                self.report(stall)

    def check(self, now: float) -> Stall | None:
        for rank, record in read_heartbeats(self.store, self.watched).items():
            self.peers[rank].observe(record, now)
        me = Peer(seen_at=now, record=self.hb.record(self.rank, self.host, self.pid))
        return judge({**self.peers, self.rank: me}, now, self.limit)

    def report(self, stall: Stall) -> None:
        sentence = stall_sentence(stall, self.limit)
        claim = f"{self.rank}:{sentence}"
        try:
            won = self.store.compare_set(REPORT_KEY, "", claim).decode() == claim
        except Exception:
            won = True  # no store to agree through: better twice than never
        if won:
            leave_sentence(sentence)
        _exit(1)


def start_watchdog(cfg: Config, topo: Topology) -> Watchdog:
    return Watchdog(topo, cfg.parallel.stall_timeout_s).start()


def _install_test_stall(dog: Watchdog) -> None:
    """Tests only (`TEST_STALL_ENV`): make this rank stall on entering a phase at a step.

    ``stop`` publishes the phase, then SIGSTOPs the whole process (as a frozen rank: no
    more heartbeats); ``hang`` sleeps in it with the watchdog alive (a hung collective).
    The hook replaces `phase` on this one heartbeat: runs without it pay nothing."""
    spec = os.environ.get(TEST_STALL_ENV)
    if not spec:
        return
    rank, step, action, target = spec.split(":", 3)
    if int(rank) != dog.rank:
        return
    hb, original = dog.hb, Heartbeat.phase

    def phase(name: str, detail: object = None, slow: bool = False) -> None:
        original(hb, name, detail, slow)
        if hb.step == int(step) and hb.phase_text() == target:
            dog.publish()
            if action == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            while True:
                time.sleep(60)

    hb.phase = phase  # type: ignore[method-assign]
