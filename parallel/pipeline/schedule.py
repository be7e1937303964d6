"""Pipeline schedules as data: pure functions from (stages, stage, microbatches) to steps.

A schedule is the list of compute steps one stage runs, ``F3`` (forward of microbatch
3) or ``B3`` (its backward). It can be printed, compared and tested without a process;
`plan` turns it into the actions the executor (`parallel.pipeline.executor`) runs, inserting the
point-to-point transfers each step implies; `simulate` runs the plans of every stage
together, process-free, to get the total time and to prove a plan cannot deadlock.

1F1B (PipeDream-Flush, Megatron's default) on stage r of p with m microbatches::

    warm-up     min(p-r-1, m) forwards
    steady      m - warm-up pairs of (forward, backward)
    cool-down   the remaining backwards

so stage r never holds more than min(p-r, m) microbatches' activations, against m for
GPipe (all forwards, then all backwards), with the same bubble (p-1)/(m+p-1).

Transfers in a plan are fused the way Megatron fuses them: what a step sends and what
the next step receives go out as one batch (e.g. "send activation i to the next stage +
receive the gradient of j from it"), and a batch is waited on before the next compute.
The simulator treats a send as complete only when the matching receive is posted
(rendezvous, the strictest semantics either gloo or NCCL can show), so a plan that the
simulator finishes cannot deadlock on a real backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from trident.errors import UserError
from trident.parallel.pipeline.timeline import Event


# --- steps and actions ---------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One compute step of a stage: kind "F" (forward) or "B" (backward) of microbatch `mb`."""

    kind: str
    mb: int

    def __str__(self) -> str:
        return f"{self.kind}{self.mb}"


@dataclass(frozen=True)
class Transfer:
    """One point-to-point operation: send or recv an activation ("act", forward direction)
    or an activation gradient ("grad", backward direction) of `mb` with a neighbour."""

    op: str  # send | recv
    what: str  # act | grad
    peer: str  # prev | next
    mb: int

    def __str__(self) -> str:
        return f"{self.op} {self.what} {self.mb}"


@dataclass(frozen=True)
class Exchange:
    """Transfers posted together as one batch and waited on together."""

    transfers: tuple[Transfer, ...]

    def __str__(self) -> str:
        return " + ".join(str(t) for t in self.transfers)


Action = Step | Exchange


def F(mb: int) -> Step:
    return Step("F", mb)


def B(mb: int) -> Step:
    return Step("B", mb)


# --- schedules -----------------------------------------------------------------------------
def one_f_one_b(stages: int, stage: int, microbatches: int) -> list[Step]:
    """1F1B: warm-up forwards, then one forward / one backward, then cool-down backwards."""
    _check(stages, stage, microbatches)
    warmup = min(stages - stage - 1, microbatches)
    steps = [F(i) for i in range(warmup)]
    for i in range(microbatches - warmup):
        steps += [F(warmup + i), B(i)]
    steps += [B(i) for i in range(microbatches - warmup, microbatches)]
    return steps


def gpipe(stages: int, stage: int, microbatches: int) -> list[Step]:
    """GPipe: every forward, then every backward (in the same microbatch order)."""
    _check(stages, stage, microbatches)
    return [F(i) for i in range(microbatches)] + [B(i) for i in range(microbatches)]


def forward_only(stages: int, stage: int, microbatches: int) -> list[Step]:
    """Evaluation: forwards only, nothing kept for a backward."""
    _check(stages, stage, microbatches)
    return [F(i) for i in range(microbatches)]


SCHEDULES: dict[str, Callable[[int, int, int], list[Step]]] = {"1f1b": one_f_one_b, "gpipe": gpipe}


def schedule_steps(name: str, stages: int, stage: int, microbatches: int) -> list[Step]:
    if name not in SCHEDULES:
        raise UserError(f"unknown pipeline schedule {name!r}; valid schedules are {', '.join(SCHEDULES)}")
    return SCHEDULES[name](stages, stage, microbatches)


def in_flight_limit(name: str, stages: int, stage: int, microbatches: int) -> int:
    """Most microbatches whose activations a stage may hold at once under schedule `name`:
    the bound the executor asserts, read off the schedule's own list (min(p-r, m) for
    1F1B, m for GPipe), so a new schedule brings its bound with it."""
    return peak_in_flight(schedule_steps(name, stages, stage, microbatches))


def peak_in_flight(steps: Sequence[Step]) -> int:
    """Largest number of forwarded-but-not-yet-backwarded microbatches along a step list."""
    held = peak = 0
    for step in steps:
        held += 1 if step.kind == "F" else -1
        peak = max(peak, held)
    return peak


def _check(stages: int, stage: int, microbatches: int) -> None:
    if not isinstance(stages, int) or stages < 1:
        raise UserError(f"a pipeline needs a whole number of stages >= 1, got {stages!r}")
    if not isinstance(stage, int) or not 0 <= stage < stages:
        raise UserError(f"stage {stage!r} is outside a pipeline of {stages} stages (valid: 0..{stages - 1})")
    if not isinstance(microbatches, int) or isinstance(microbatches, bool) or microbatches < 1:
        raise UserError(f"the number of microbatches must be a whole number >= 1, got {microbatches!r}")


# --- plans: steps plus the transfers they imply --------------------------------------------
def _receives(step: Step, stage: int, stages: int) -> list[Transfer]:
    if step.kind == "F" and stage > 0:
        return [Transfer("recv", "act", "prev", step.mb)]
    if step.kind == "B" and stage < stages - 1:
        return [Transfer("recv", "grad", "next", step.mb)]
    return []


def _sends(step: Step, stage: int, stages: int) -> list[Transfer]:
    if step.kind == "F" and stage < stages - 1:
        return [Transfer("send", "act", "next", step.mb)]
    if step.kind == "B" and stage > 0:
        return [Transfer("send", "grad", "prev", step.mb)]
    return []


def plan(steps: Sequence[Step], stage: int, stages: int) -> list[Action]:
    """The actions that run `steps` on `stage`: each step's sends are batched with the
    receives of the step after it, as one `Exchange` before that step."""
    actions: list[Action] = []
    pending: list[Transfer] = []
    for step in steps:
        batch = pending + _receives(step, stage, stages)
        if batch:
            actions.append(Exchange(tuple(batch)))
        actions.append(step)
        pending = _sends(step, stage, stages)
    if pending:
        actions.append(Exchange(tuple(pending)))
    return actions


def format_schedule(name: str, stages: int, microbatches: int) -> str:
    """One line per stage, e.g. ``stage 0: F0 F1 F2 F3 B0 F4 B1 ...`` (for docs and logs)."""
    width = len(str(stages - 1))
    return "\n".join(
        f"stage {r:>{width}}: " + " ".join(str(s) for s in schedule_steps(name, stages, r, microbatches))
        for r in range(stages)
    )


# --- a process-free simulator -----------------------------------------------------------------
class DeadlockError(RuntimeError):
    """The stages' plans wait on each other in a cycle: no real run could finish."""


@dataclass
class Simulation:
    total: float  # time at which the last stage finishes
    events: list[Event]  # forward, backward and transfer intervals of every stage

    def stage_busy(self, stage: int) -> float:
        return sum(e.duration for e in self.events if e.stage == stage and e.cat != "transfer")


def simulate(
    plans: Sequence[Sequence[Action]],
    t_forward: float | Sequence[float] = 1.0,
    t_backward: float | Sequence[float] = 2.0,
    t_transfer: float = 0.0,
) -> Simulation:
    """Run every stage's plan with fixed costs (per stage when sequences) and rendezvous
    transfers: an operation completes `t_transfer` after both its ends are posted, and an
    `Exchange` when all its operations have. Raises `DeadlockError` if no stage can move,
    and `ValueError` if the two ends of a channel disagree on which microbatch is next.
    """
    sim = _Simulator(plans, t_forward, t_backward, t_transfer)
    progressed = True
    while progressed:  # sweep the stages until none can move
        progressed = False
        for r in range(len(plans)):
            while sim.pos[r] < len(plans[r]) and sim.advance(r):
                progressed = True
    stuck = [r for r in range(len(plans)) if sim.pos[r] < len(plans[r])]
    if stuck:
        waits = "; ".join(f"stage {r} waits in '{plans[r][sim.pos[r]]}'" for r in stuck)
        raise DeadlockError(f"the plans deadlock: {waits}")
    return Simulation(total=max(sim.clock) if sim.clock else 0.0, events=sim.events)


Channel = tuple[int, int, str]  # (sending stage, receiving stage, "act" | "grad")


class _Simulator:
    """The clocks and posted transfers of every stage; `advance` moves one stage one action."""

    def __init__(self, plans: Sequence[Sequence[Action]], t_forward: float | Sequence[float],
                 t_backward: float | Sequence[float], t_transfer: float) -> None:
        p = self.p = len(plans)
        self.plans, self.t_transfer = plans, t_transfer
        self.tf = [t_forward] * p if isinstance(t_forward, (int, float)) else list(t_forward)
        self.tb = [t_backward] * p if isinstance(t_backward, (int, float)) else list(t_backward)
        self.pos = [0] * p  # next action of each stage
        self.clock = [0.0] * p
        # channel -> list of (mb, post time) in posting order, per side
        self.posted: dict[str, dict[Channel, list[tuple[int, float]]]] = {"send": {}, "recv": {}}
        # the (op, channel, index) each posted operation of a stage's current exchange occupies
        self.current: list[list[tuple[str, Channel, int]] | None] = [None] * p
        self.events: list[Event] = []

    def channel(self, stage: int, t: Transfer) -> Channel:
        other = stage - 1 if t.peer == "prev" else stage + 1
        if not 0 <= other < self.p:
            raise ValueError(f"stage {stage} of {self.p} has no {t.peer} stage for '{t}'")
        return (stage, other, t.what) if t.op == "send" else (other, stage, t.what)

    def advance(self, r: int) -> bool:
        """Carry out stage `r`'s next action if it can; False if it is blocked."""
        action = self.plans[r][self.pos[r]]
        if isinstance(action, Step):
            cost = self.tf[r] if action.kind == "F" else self.tb[r]
            cat = "forward" if action.kind == "F" else "backward"
            self.events.append(Event(r, r, str(action), cat, self.clock[r], self.clock[r] + cost, action.mb))
            self.clock[r] += cost
            self.pos[r] += 1
            return True
        posted_now = self.current[r] is None
        if posted_now:  # post every operation of the batch now
            self.current[r] = [self._post(r, t) for t in action.transfers]
        ready = self._ready(r)
        if ready is None:
            return posted_now  # blocked; another stage must move first
        done_at = ready + self.t_transfer  # the operations of a batch run side by side
        self.events.append(Event(r, r, str(action), "transfer", self.clock[r], done_at))
        self.clock[r] = done_at
        self.current[r] = None
        self.pos[r] += 1
        return True

    def _post(self, r: int, t: Transfer) -> tuple[str, Channel, int]:
        ch = self.channel(r, t)
        side = self.posted[t.op].setdefault(ch, [])
        side.append((t.mb, self.clock[r]))
        return t.op, ch, len(side) - 1

    def _ready(self, r: int) -> float | None:
        """When every operation of stage r's current exchange has both ends posted, or None."""
        ready = self.clock[r]
        for op, ch, idx in self.current[r] or []:
            other = self.posted["recv" if op == "send" else "send"].get(ch, [])
            if len(other) <= idx:
                return None
            mine_mb, mine_t = self.posted[op][ch][idx]
            their_mb, their_t = other[idx]
            if mine_mb != their_mb:
                raise ValueError(
                    f"channel {ch[0]}->{ch[1]} ({ch[2]}): operation {idx} is microbatch {mine_mb} "
                    f"on one end and {their_mb} on the other"
                )
            ready = max(ready, mine_t, their_t)
        return ready


def simulate_schedule(
    name: str, stages: int, microbatches: int, t_forward: float = 1.0, t_backward: float = 2.0, t_transfer: float = 0.0
) -> Simulation:
    """`simulate` for the plans of a named schedule on every stage."""
    plans = [plan(schedule_steps(name, stages, r, microbatches), r, stages) for r in range(stages)]
    return simulate(plans, t_forward, t_backward, t_transfer)


def ideal_time(stages: int, microbatches: int, t_forward: float, t_backward: float) -> float:
    """(m + p - 1)(tf + tb): a 1F1B or GPipe step with free transfers and uniform stages."""
    return (microbatches + stages - 1) * (t_forward + t_backward)


def bubble_fraction(stages: int, microbatches: int) -> float:
    """(p - 1) / (m + p - 1): the share of each stage's time spent idle in that ideal step."""
    return (stages - 1) / (microbatches + stages - 1)
