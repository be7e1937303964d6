"""This rank's heartbeat: which step it is in and what it is doing, for the stall watchdog.

A stalled rank (stopped, hung in a collective, cut off from the network) used to show
only as every *other* rank failing at the collective timeout, each with a gloo
traceback. To name the one that stalled, every rank keeps its current phase here and
the watchdog (`trident.training.watchdog`) publishes it to the rendezvous store every
few seconds and reads a few peers' records.

The hot path only calls `phase` (and the loop `begin_step`): one tuple stored in an
attribute, no lock, no I/O, no formatting -- a detail such as a microbatch index or a
p2p exchange is turned into text only when a record is published. Publishing goes
through the c10d store the process group was made with, never a collective: a stuck
collective cannot stop it and it cannot disturb one.

A record is JSON: ``{rank, host, pid, step, phase, in_phase_s, slow, waiting, armed, seq, done}``.
It holds no wall-clock time on purpose: hosts' clocks disagree, so a reader measures
ages on its own clock, from when it saw `seq` change, plus the `in_phase_s` the writer
measured on its clock (`trident.training.watchdog.Peer`).
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch.distributed as dist

KEY = "watchdog/heartbeat/{rank}"  # under the store's per-attempt prefix (Topology.from_env)


def heartbeat_key(rank: int) -> str:
    return KEY.format(rank=rank)


class Heartbeat:
    """What this rank is doing now. One per process, carried by the `Topology`."""

    def __init__(self) -> None:
        # (name, detail, monotonic time entered, slow, waiting); one tuple so a reader on
        # another thread never sees the name of one phase with the start time of another
        self.current: tuple[str, object, float, bool, bool] = ("start-up", None, time.monotonic(), True, False)
        self.step = 0  # the step in progress (1-based, as the logs count), 0 before the first
        self.steps_begun = 0  # steps begun in this process: progress is judged from the second on
        self.seq = 0  # records published: a reader sees a live publisher by this changing
        self.done = False

    def phase(self, name: str, detail: object = None, slow: bool = False) -> None:
        """Enter a phase, e.g. ``phase("forward mb", 3)``. `detail` is formatted with
        ``str`` only when published. A `slow` phase (checkpoint save, resume) may wait on
        its peers longer than the stall timeout: only the collective timeout ends it."""
        self.current = (name, detail, time.monotonic(), slow, False)

    def waiting(self, name: str, detail: object = None) -> None:
        """Enter a phase that waits on peers (a p2p exchange, a collective): a rank stuck
        here is more likely waiting for the stalled rank than stalled itself."""
        self.current = (name, detail, time.monotonic(), False, True)

    def begin_step(self, step: int) -> None:
        """The loop starts step `step` (1-based); its first phase is reading the batch."""
        self.step = step
        self.steps_begun += 1
        self.current = ("load data", None, time.monotonic(), False, False)

    def phase_text(self) -> str:
        name, detail = self.current[0], self.current[1]
        return name if detail is None else f"{name} {detail}"

    def record(self, rank: int, host: str, pid: int) -> dict[str, Any]:
        """This rank's record as published (`seq` is the number of the next publish)."""
        _, _, since, slow, waiting = self.current
        return {
            "rank": rank, "host": host, "pid": pid, "step": self.step, "phase": self.phase_text(),
            "in_phase_s": round(time.monotonic() - since, 3), "slow": slow, "waiting": waiting,
            # the first step of a process includes compilation and lazy communicator set-up,
            # which may legitimately outlast the stall timeout: progress counts from step two
            "armed": self.steps_begun >= 2, "seq": self.seq + 1, "done": self.done,
        }

    def publish(self, store: dist.Store, rank: int, host: str, pid: int) -> dict[str, Any]:
        record = self.record(rank, host, pid)
        store.set(heartbeat_key(rank), json.dumps(record))
        self.seq = record["seq"]
        return record


def read_heartbeats(store: dist.Store, ranks: list[int]) -> dict[int, dict[str, Any]]:
    """The published records of `ranks` that exist yet, in one round trip once all exist.

    ``multi_get`` blocks on a missing key (up to the store's timeout), so keys are
    checked first; a rank that has not published yet is simply absent."""
    keys = [heartbeat_key(r) for r in ranks]
    present = ranks if keys and store.check(keys) else [r for r, k in zip(ranks, keys) if store.check([k])]
    if not present:
        return {}
    values = store.multi_get([heartbeat_key(r) for r in present])
    return {r: json.loads(v) for r, v in zip(present, values)}
