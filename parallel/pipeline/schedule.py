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
    the bound the executor asserts (min(p-r, m) for 1F1B, m for GPipe)."""
    if name == "1f1b":
        return min(stages - stage, microbatches)
    if name == "gpipe":
        return microbatches
    raise UserError(f"unknown pipeline schedule {name!r}; valid schedules are {', '.join(SCHEDULES)}")


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
    p = len(plans)
    tf = [t_forward] * p if isinstance(t_forward, (int, float)) else list(t_forward)
    tb = [t_backward] * p if isinstance(t_backward, (int, float)) else list(t_backward)
    pos = [0] * p  # next action of each stage
    clock = [0.0] * p
    # channel (src, dst, what) -> list of (mb, post time) in posting order, per side
    posted_send: dict[tuple[int, int, str], list[tuple[int, float]]] = {}
    posted_recv: dict[tuple[int, int, str], list[tuple[int, float]]] = {}
    # the (channel, index) each posted operation of a stage's current exchange occupies
    current: list[list[tuple[str, tuple[int, int, str], int]] | None] = [None] * p
    events: list[Event] = []

    def channel(stage: int, t: Transfer) -> tuple[int, int, str]:
        other = stage - 1 if t.peer == "prev" else stage + 1
        if not 0 <= other < p:
            raise ValueError(f"stage {stage} of {p} has no {t.peer} stage for '{t}'")
        return (stage, other, t.what) if t.op == "send" else (other, stage, t.what)

    progressed = True
    while progressed:
        progressed = False
        for r in range(p):
            while pos[r] < len(plans[r]):
                action = plans[r][pos[r]]
                if isinstance(action, Step):
                    cost = tf[r] if action.kind == "F" else tb[r]
                    cat = "forward" if action.kind == "F" else "backward"
                    events.append(Event(r, r, str(action), cat, clock[r], clock[r] + cost, action.mb))
                    clock[r] += cost
                    pos[r] += 1
                    progressed = True
                    continue
                if current[r] is None:  # post every operation of the batch now
                    slots = []
                    for t in action.transfers:
                        ch = channel(r, t)
                        side = posted_send if t.op == "send" else posted_recv
                        side.setdefault(ch, []).append((t.mb, clock[r]))
                        slots.append((t.op, ch, len(side[ch]) - 1))
                    current[r] = slots
                    progressed = True
                ready: float | None = clock[r]  # when every operation has both ends posted
                for op, ch, idx in current[r]:
                    other = posted_recv if op == "send" else posted_send
                    if len(other.get(ch, [])) <= idx:
                        ready = None
                        break
                    mine_mb, mine_t = (posted_send if op == "send" else posted_recv)[ch][idx]
                    their_mb, their_t = other[ch][idx]
                    if mine_mb != their_mb:
                        raise ValueError(
                            f"channel {ch[0]}->{ch[1]} ({ch[2]}): operation {idx} is microbatch {mine_mb} "
                            f"on one end and {their_mb} on the other"
                        )
                    ready = max(ready, mine_t, their_t)
                if ready is None:
                    break  # blocked; another stage must move first
                done_at = ready + t_transfer  # the operations of a batch run side by side
                events.append(Event(r, r, str(action), "transfer", clock[r], done_at))
                clock[r] = done_at
                current[r] = None
                pos[r] += 1
                progressed = True
    stuck = [r for r in range(p) if pos[r] < len(plans[r])]
    if stuck:
        waits = "; ".join(f"stage {r} waits in '{plans[r][pos[r]]}'" for r in stuck)
        raise DeadlockError(f"the plans deadlock: {waits}")
    return Simulation(total=max(clock) if clock else 0.0, events=events)


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
