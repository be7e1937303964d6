"""A process-free simulator of pipeline plans: step times, and a proof of no deadlock.

`simulate` runs the plans of every rank together with fixed costs. It treats a transfer
as complete only when the matching operation is posted on the other rank (rendezvous,
the strictest semantics either gloo or NCCL can show), and matches the operations of a
rank pair in posting order whatever they carry (NCCL has no tags), so a plan the
simulator finishes cannot deadlock or pair the wrong tensors on a real backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from trident.parallel.pipeline.schedule import Action, Step, Transfer, plan, schedule_steps
from trident.parallel.pipeline.timeline import Event


class DeadlockError(RuntimeError):
    """The ranks' plans wait on each other in a cycle: no real run could finish."""


@dataclass
class Simulation:
    total: float  # time at which the last rank finishes
    events: list[Event]  # forward, backward, weight and transfer intervals of every rank

    def stage_busy(self, stage: int) -> float:
        return sum(e.duration for e in self.events if e.stage == stage and e.cat != "transfer")


_CATEGORY = {"F": "forward", "B": "backward", "W": "weight"}


def simulate(
    plans: Sequence[Sequence[Action]],
    t_forward: float | Sequence[float] = 1.0,
    t_backward: float | Sequence[float] = 2.0,
    t_transfer: float = 0.0,
    t_weight: float | None = None,
) -> Simulation:
    """Run every rank's plan with fixed costs per step (per rank when sequences).

    A backward costs `t_backward`; when its microbatch also has a W step on that rank, the
    B costs ``t_backward - t_weight`` and the W `t_weight` (default: half of `t_backward`).
    An exchange completes `t_transfer` after all its operations have both ends posted.
    Raises `DeadlockError` if no rank can move, and `ValueError` if the two ends of a
    rank pair disagree on what their next operation carries.
    """
    sim = _Simulator(plans, t_forward, t_backward, t_transfer, t_weight)
    progressed = True
    while progressed:  # sweep the ranks until none can move
        progressed = False
        for r in range(len(plans)):
            while sim.pos[r] < len(plans[r]) and sim.advance(r):
                progressed = True
    stuck = [r for r in range(len(plans)) if sim.pos[r] < len(plans[r])]
    if stuck:
        waits = "; ".join(f"stage {r} waits in '{plans[r][sim.pos[r]]}'" for r in stuck)
        raise DeadlockError(f"the plans deadlock: {waits}")
    return Simulation(total=max(sim.clock) if sim.clock else 0.0, events=sim.events)


Pair = tuple[int, int]  # (sending rank, receiving rank)
Label = tuple[str, int, int]  # (act | grad, virtual-stage edge, microbatch)


class _Simulator:
    """The clocks and posted transfers of every rank; `advance` moves one rank one action."""

    def __init__(self, plans: Sequence[Sequence[Action]], t_forward: float | Sequence[float],
                 t_backward: float | Sequence[float], t_transfer: float, t_weight: float | None) -> None:
        p = self.p = len(plans)
        self.plans, self.t_transfer = plans, t_transfer
        self.tf = [t_forward] * p if isinstance(t_forward, (int, float)) else list(t_forward)
        self.tb = [t_backward] * p if isinstance(t_backward, (int, float)) else list(t_backward)
        self.tw = [b / 2 if t_weight is None else t_weight for b in self.tb]
        self.split = [{a.key for a in pl if isinstance(a, Step) and a.kind == "W"} for pl in plans]
        self.pos = [0] * p  # next action of each rank
        self.clock = [0.0] * p
        # rank pair -> list of (label, post time) in posting order, per side
        self.posted: dict[str, dict[Pair, list[tuple[Label, float]]]] = {"send": {}, "recv": {}}
        # the (op, pair, index) each posted operation of a rank's current exchange occupies
        self.current: list[list[tuple[str, Pair, int]] | None] = [None] * p
        self.outstanding: list[list[tuple[str, Pair, int]]] = [[] for _ in range(p)]  # posted, not waited
        self.events: list[Event] = []

    def _cost(self, r: int, step: Step) -> float:
        if step.kind == "F":
            return self.tf[r]
        if step.kind == "W":
            return self.tw[r]
        return self.tb[r] - (self.tw[r] if step.key in self.split[r] else 0.0)

    def route(self, r: int, t: Transfer) -> tuple[Pair, Label]:
        """The rank pair a transfer uses and what it carries: the edge between virtual
        stages e and e+1 (chunk c of rank r is virtual stage c·p + r)."""
        s = t.chunk * self.p + r
        edge = s if (t.op, t.what) in (("send", "act"), ("recv", "grad")) else s - 1
        if edge < 0:
            raise ValueError(f"stage {r} of {self.p} has no {t.peer} stage for '{t}'")
        other = (r + 1) % self.p if t.peer == "next" else (r - 1) % self.p
        pair = (r, other) if t.op == "send" else (other, r)
        return pair, (t.what, edge, t.mb)

    def advance(self, r: int) -> bool:
        """Carry out rank `r`'s next action if it can; False if it is blocked."""
        action = self.plans[r][self.pos[r]]
        if isinstance(action, Step):
            cost = self._cost(r, action)
            self.events.append(
                Event(r, r, str(action), _CATEGORY[action.kind], self.clock[r], self.clock[r] + cost, action.mb)
            )
            self.clock[r] += cost
            self.pos[r] += 1
            return True
        posted_now = self.current[r] is None
        if posted_now:  # post every operation of the batch now
            self.current[r] = [self._post(r, t) for t in action.transfers]
        if not action.wait:  # in flight while the rank computes; the next waiting batch waits
            self.outstanding[r] += self.current[r] or []
            self.current[r] = None
            self.pos[r] += 1
            return True
        ready = self._ready(r)
        if ready is None:
            return posted_now  # blocked; another rank must move first
        done_at = ready + self.t_transfer  # the operations of a batch run side by side
        self.events.append(Event(r, r, str(action), "transfer", self.clock[r], done_at))
        self.clock[r] = done_at
        self.current[r] = None
        self.outstanding[r] = []
        self.pos[r] += 1
        return True

    def _post(self, r: int, t: Transfer) -> tuple[str, Pair, int]:
        pair, label = self.route(r, t)
        side = self.posted[t.op].setdefault(pair, [])
        side.append((label, self.clock[r]))
        return t.op, pair, len(side) - 1

    def _ready(self, r: int) -> float | None:
        """When every operation of rank r's current exchange has both ends posted, or None."""
        ready = self.clock[r]
        for op, pair, idx in (self.current[r] or []) + self.outstanding[r]:
            other = self.posted["recv" if op == "send" else "send"].get(pair, [])
            if len(other) <= idx:
                return None
            mine, mine_t = self.posted[op][pair][idx]
            theirs, their_t = other[idx]
            if mine != theirs:
                raise ValueError(
                    f"ranks {pair[0]}->{pair[1]}: operation {idx} is {mine} (what, edge, microbatch) on one "
                    f"end and {theirs} on the other"
                )
            ready = max(ready, mine_t, their_t)
        return ready


def simulate_schedule(
    name: str, stages: int, microbatches: int, t_forward: float = 1.0, t_backward: float = 2.0,
    t_transfer: float = 0.0, vpp: int = 1, t_weight: float | None = None,
) -> Simulation:
    """`simulate` for the plans of a named schedule on every rank. Costs are per rank (its
    whole model part): with v virtual stages each chunk's step costs 1/v of them."""
    plans = [plan(schedule_steps(name, stages, r, microbatches, vpp), r, stages, vpp) for r in range(stages)]
    tw = None if t_weight is None else t_weight / vpp
    return simulate(plans, t_forward / vpp, t_backward / vpp, t_transfer, tw)
