"""Pipeline schedules as data: pure functions from (stages, stage, microbatches, vpp) to steps.

A schedule is the list of compute steps one rank runs: ``F3`` (forward of microbatch 3),
``B3`` (its backward) and, in zero-bubble schedules, ``W3`` (the weight-gradient half of
that backward, split off B). With virtual stages (interleaved) each step also names the
model chunk it runs, printed ``F3.1``. A schedule can be printed, compared and tested
without a process; `plan` turns it into the actions the executor
(`parallel.pipeline.executor`) runs, inserting the point-to-point transfers each step
implies, and `parallel.pipeline.simulate` runs the plans of every rank together,
process-free, to time them and to prove that they cannot deadlock.

The schedules on rank r of p with m microbatches (and v chunks per rank):

* **1F1B** (PipeDream-Flush, Megatron's default): warm-up min(p-r-1, m) forwards, then
  (forward, backward) pairs, then the remaining backwards. Rank r holds at most
  min(p-r, m) microbatches' activations; idle share (p-1)/(m+p-1).
* **GPipe**: every forward, then every backward; m microbatches held, same bubble.
* **Interleaved 1F1B** (Megatron's virtual pipeline, Narayanan et al. 2021): rank r holds
  chunks r, r+p, ..., r+(v-1)p of the p·v virtual stages; microbatches go in groups of p
  through a chunk, then the next chunk; warm-up (p-r-1)·2 + (v-1)·p forwards. The bubble
  shrinks v-fold, (p-1)/(v·m+p-1) of the step, for 1 + (p-1)/(p·v) times 1F1B's peak
  activations on rank 0 and v times the transfers. Needs m a multiple of p, as in Megatron.
* **ZB-H1** (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024): each backward is
  split into B (the input's gradient, on the critical path) and W (the weights'
  gradients, deferrable). Rank r runs 1F1B's warm-up, then r (F, B) pairs whose W waits,
  then (F, B, W) triples, then (B, W) pairs and finally its r deferred Ws: the Ws fill
  the cool-down bubble. No rank holds more than p microbatches (1F1B's peak, on rank 0),
  and with tb = tB + tW the step takes m(tf+tb) + (p-1)(tf+tB-tW), against 1F1B's
  (m+p-1)(tf+tb): a third of the bubble when tf = tB = tW.

Transfers in a plan are fused the way Megatron fuses them: what a step sends and what the
next step receives go out as one batch (e.g. "send activation i to the next stage +
receive the gradient of j from it"), and a batch is waited on before the next compute. A
B's gradient is sent before any W that follows it runs (the W is off the critical path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from trident.errors import UserError


# --- steps and actions ---------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One compute step: kind "F" (forward), "B" (backward; only the input's gradient when a
    "W" of the same microbatch and chunk follows) or "W" (the weights' gradients)."""

    kind: str
    mb: int
    chunk: int = 0  # which of this rank's virtual stages (0 without interleaving)

    def __str__(self) -> str:
        return f"{self.kind}{self.mb}" + (f".{self.chunk}" if self.chunk else "")

    @property
    def key(self) -> tuple[int, int]:
        return (self.chunk, self.mb)


@dataclass(frozen=True)
class Transfer:
    """One point-to-point operation: send or recv an activation ("act", forward direction)
    or an activation gradient ("grad", backward direction) of (`chunk`, `mb`) with the
    previous or next rank. `chunk` is the chunk on THIS rank that produces or consumes it."""

    op: str  # send | recv
    what: str  # act | grad
    peer: str  # prev | next
    mb: int
    chunk: int = 0

    def __str__(self) -> str:
        return f"{self.op} {self.what} {self.mb}" + (f".{self.chunk}" if self.chunk else "")


@dataclass(frozen=True)
class Exchange:
    """Transfers posted together as one batch. With `wait` (the default) the batch is
    waited on, together with any batch posted earlier without waiting, before the next
    step; without, the rank goes on computing while it is in flight (a B's gradient sent
    upstream while the W that follows it runs)."""

    transfers: tuple[Transfer, ...]
    wait: bool = True

    def __str__(self) -> str:
        text = " + ".join(str(t) for t in self.transfers) or "wait"
        return text if self.wait else f"post {text}"


Action = Step | Exchange


def F(mb: int, chunk: int = 0) -> Step:
    return Step("F", mb, chunk)


def B(mb: int, chunk: int = 0) -> Step:
    return Step("B", mb, chunk)


def W(mb: int, chunk: int = 0) -> Step:
    return Step("W", mb, chunk)


# --- schedules -----------------------------------------------------------------------------
def one_f_one_b(stages: int, stage: int, microbatches: int, vpp: int = 1) -> list[Step]:
    """1F1B: warm-up forwards, then one forward / one backward, then cool-down backwards."""
    _check(stages, stage, microbatches, vpp, "1f1b")
    warmup = min(stages - stage - 1, microbatches)
    steps = [F(i) for i in range(warmup)]
    for i in range(microbatches - warmup):
        steps += [F(warmup + i), B(i)]
    steps += [B(i) for i in range(microbatches - warmup, microbatches)]
    return steps


def gpipe(stages: int, stage: int, microbatches: int, vpp: int = 1) -> list[Step]:
    """GPipe: every forward, then every backward (in the same microbatch order)."""
    _check(stages, stage, microbatches, vpp, "gpipe")
    return [F(i) for i in range(microbatches)] + [B(i) for i in range(microbatches)]


def interleaved(stages: int, stage: int, microbatches: int, vpp: int = 2) -> list[Step]:
    """Interleaved 1F1B: the k-th forward of a rank is microbatch (k // pv)·p + k % p of
    chunk (k // p) % v, its k-th backward the same microbatch of chunk v-1 - (k // p) % v."""
    _check(stages, stage, microbatches, vpp, "interleaved")
    p, v, m = stages, vpp, microbatches
    total = m * v

    def order(k: int, backward: bool) -> tuple[int, int]:
        chunk = (k // p) % v
        return (v - 1 - chunk if backward else chunk), (k // (p * v)) * p + k % p

    # all forwards first when m == p (Megatron does the same: no steady state is left)
    warmup = total if m == p else min((p - stage - 1) * 2 + (v - 1) * p, total)
    steps = [F(*reversed(order(k, False))) for k in range(warmup)]
    for i in range(total - warmup):
        steps += [F(*reversed(order(warmup + i, False))), B(*reversed(order(i, True)))]
    steps += [B(*reversed(order(k, True))) for k in range(total - warmup, total)]
    return steps


def zb_h1(stages: int, stage: int, microbatches: int, vpp: int = 1) -> list[Step]:
    """ZB-H1: 1F1B's warm-up, r (F, B) pairs deferring their W, (F, B, W) triples, (B, W)
    pairs, then the deferred Ws (oldest first)."""
    _check(stages, stage, microbatches, vpp, "zb-h1")
    m = microbatches
    f = b = w = 0
    steps: list[Step] = []
    for _ in range(min(stages - stage - 1, m)):
        steps.append(F(f))
        f += 1
    for _ in range(stage):
        if f == m:
            break
        steps += [F(f), B(b)]
        f, b = f + 1, b + 1
    while f < m:
        steps += [F(f), B(b), W(w)]
        f, b, w = f + 1, b + 1, w + 1
    while b < m:
        steps += [B(b), W(w)]
        b, w = b + 1, w + 1
    steps += [W(i) for i in range(w, m)]
    return steps


def forward_only(stages: int, stage: int, microbatches: int, vpp: int = 1) -> list[Step]:
    """Evaluation: forwards only (through every chunk), nothing kept for a backward."""
    _check(stages, stage, microbatches, vpp, "forward-only")
    if vpp == 1:
        return [F(i) for i in range(microbatches)]
    return [s for s in interleaved(stages, stage, microbatches, vpp) if s.kind == "F"]


Schedule = Callable[[int, int, int, int], list[Step]]
SCHEDULES: dict[str, Schedule] = {"1f1b": one_f_one_b, "interleaved": interleaved, "zb-h1": zb_h1, "gpipe": gpipe}
SPLIT_BACKWARD = ("zb-h1",)  # schedules whose backward is B (input) + W (weights)


def schedule_steps(name: str, stages: int, stage: int, microbatches: int, vpp: int = 1) -> list[Step]:
    if name not in SCHEDULES:
        raise UserError(f"unknown pipeline schedule {name!r}; valid schedules are {', '.join(SCHEDULES)}")
    return SCHEDULES[name](stages, stage, microbatches, vpp)


def check_layout(name: str, stages: int, microbatches: int, vpp: int) -> None:
    """The checks every rank makes identically before its first transfer (one sentence each)."""
    _check(stages, 0, microbatches, vpp, name)


def in_flight_limit(name: str, stages: int, stage: int, microbatches: int, vpp: int = 1) -> int:
    """Most (chunk, microbatch) pairs whose activations a rank may hold at once under
    schedule `name`: the bound the executor asserts, read off the schedule's own list
    (min(p-r, m) for 1F1B, m for GPipe, min(p, m) for ZB-H1), so a new schedule brings its bound."""
    return peak_in_flight(schedule_steps(name, stages, stage, microbatches, vpp))


def peak_in_flight(steps: Sequence[Step]) -> int:
    """Largest number of (chunk, microbatch) pairs forwarded and not yet fully backwarded
    (their W done, when the schedule splits the backward) along a step list."""
    split = {s.key for s in steps if s.kind == "W"}
    held = peak = 0
    for step in steps:
        if step.kind == "F":
            held += 1
        elif step.kind == "W" or step.key not in split:
            held -= 1
        peak = max(peak, held)
    return peak


def _check(stages: int, stage: int, microbatches: int, vpp: int, name: str) -> None:
    if not isinstance(stages, int) or stages < 1:
        raise UserError(f"a pipeline needs a whole number of stages >= 1, got {stages!r}")
    if not isinstance(stage, int) or not 0 <= stage < stages:
        raise UserError(f"stage {stage!r} is outside a pipeline of {stages} stages (valid: 0..{stages - 1})")
    if not isinstance(microbatches, int) or isinstance(microbatches, bool) or microbatches < 1:
        raise UserError(f"the number of microbatches must be a whole number >= 1, got {microbatches!r}")
    if not isinstance(vpp, int) or isinstance(vpp, bool) or vpp < 1:
        raise UserError(f"parallel.vpp (virtual stages per rank) must be a whole number >= 1, got {vpp!r}")
    if name == "interleaved":
        if vpp < 2 or stages < 2:
            raise UserError(
                f"the interleaved schedule needs pp >= 2 and parallel.vpp >= 2 virtual stages per rank, "
                f"got pp={stages}, vpp={vpp}; use pp_schedule 1f1b for vpp=1"
            )
        if microbatches % stages != 0:
            raise UserError(
                f"the interleaved schedule runs microbatches in groups of pp={stages}, but there are "
                f"{microbatches} per step; make global_batch / (micro_batch * dp) a multiple of {stages}"
            )
    elif vpp != 1 and name != "forward-only":
        raise UserError(f"pipeline schedule {name!r} has one stage per rank; parallel.vpp={vpp} needs pp_schedule interleaved")


# --- plans: steps plus the transfers they imply --------------------------------------------
def _virtual(step: Step, stage: int, stages: int) -> int:
    return step.chunk * stages + stage


def _receives(step: Step, stage: int, stages: int, vpp: int) -> list[Transfer]:
    s, last = _virtual(step, stage, stages), stages * vpp - 1
    if step.kind == "F" and s > 0:
        return [Transfer("recv", "act", "prev", step.mb, step.chunk)]
    if step.kind == "B" and s < last:
        return [Transfer("recv", "grad", "next", step.mb, step.chunk)]
    return []


def _sends(step: Step, stage: int, stages: int, vpp: int) -> list[Transfer]:
    s, last = _virtual(step, stage, stages), stages * vpp - 1
    if step.kind == "F" and s < last:
        return [Transfer("send", "act", "next", step.mb, step.chunk)]
    if step.kind == "B" and s > 0:
        return [Transfer("send", "grad", "prev", step.mb, step.chunk)]
    return []


# the order the transfers of one batch are posted in, the same on every rank: activations
# before gradients, so that at p = 2 with interleaving (where the previous and the next
# rank are one rank) both ends post their operations on that rank pair in the same order
_POST_ORDER = {("send", "act"): 0, ("recv", "act"): 1, ("send", "grad"): 2, ("recv", "grad"): 3}


def _batch(transfers: list[Transfer], wait: bool = True) -> Exchange:
    return Exchange(tuple(sorted(transfers, key=lambda t: _POST_ORDER[(t.op, t.what)])), wait)


def plan(steps: Sequence[Step], stage: int, stages: int, vpp: int = 1) -> list[Action]:
    """The actions that run `steps` on `stage`, transfers fused into `Exchange` batches.

    One stage per rank (Megatron's 1F1B fusion): each step's sends go out with the
    receives of the next forward or backward, in one batch before it. Before a W the
    pending sends are posted without waiting: an input gradient never waits for a weight
    gradient, and the W runs while it travels (the next batch waits for it).

    Virtual stages (Megatron's interleaved fusion): steps are taken in rounds of at most
    one forward and one backward (F, F+B or B), and one batch between rounds carries the
    previous round's sends and the next round's receives. Step-by-step fusion deadlocks
    there: a rank would wait to send a gradient its neighbour receives only after
    sending it an activation the first rank receives only later.
    """
    rounds = _rounds(steps) if vpp > 1 else [[s] for s in steps]
    actions: list[Action] = []
    pending: list[Transfer] = []
    in_flight = False  # a batch posted without waiting
    for group in rounds:
        if group[0].kind == "W":
            if pending:  # post the input gradient, then compute the weights' while it travels
                actions.append(_batch(pending, wait=False))
                pending, in_flight = [], True
            actions.extend(group)
            continue
        batch = pending + [t for s in group for t in _receives(s, stage, stages, vpp)]
        if batch or in_flight:
            actions.append(_batch(batch))
            in_flight = False
        actions.extend(group)
        pending = [t for s in group for t in _sends(s, stage, stages, vpp)]
    if pending or in_flight:
        actions.append(_batch(pending))
    return actions


def _rounds(steps: Sequence[Step]) -> list[list[Step]]:
    """Consecutive steps grouped as F, F+B or B (a W is a round of its own). When every
    forward precedes every backward (interleaved with m = p) nothing is paired: the first
    backward's gradient needs the last forward's activation downstream."""
    kinds = "".join(s.kind for s in steps)
    pairs = "B" in kinds and "F" in kinds[kinds.index("B"):]
    rounds: list[list[Step]] = []
    for s in steps:
        if pairs and s.kind == "B" and rounds and [c.kind for c in rounds[-1]] == ["F"]:
            rounds[-1].append(s)
        else:
            rounds.append([s])
    return rounds


def format_schedule(name: str, stages: int, microbatches: int, vpp: int = 1) -> str:
    """One line per stage, e.g. ``stage 0: F0 F1 F2 F3 B0 F4 B1 ...`` (for docs and logs)."""
    width = len(str(stages - 1))
    return "\n".join(
        f"stage {r:>{width}}: " + " ".join(str(s) for s in schedule_steps(name, stages, r, microbatches, vpp))
        for r in range(stages)
    )


# --- the schedules' formulas (uniform stages, free transfers) --------------------------------
def ideal_time(
    stages: int, microbatches: int, t_forward: float, t_backward: float, name: str = "1f1b", vpp: int = 1,
    t_weight: float | None = None,
) -> float:
    """The step time of schedule `name` with per-rank costs tf and tb (the whole backward;
    for ZB-H1 tb = tB + tW with tW = `t_weight`, by default tb / 2):

    1F1B, GPipe   (m + p - 1)(tf + tb)
    interleaved   (m·v + p - 1)(tf + tb) / v
    ZB-H1         m(tf + tb) + (p - 1)(tf + tB - tW)   when m >= p and tW <= tB (the paper's case)
                  (m + p - 1)(tf + tB) + tW            when m < p: the pipeline never fills
    (with m >= p and tW > tB the schedule is not W-bound-free; `simulate` gives its time).
    """
    p, m = stages, microbatches
    if name == "interleaved":
        return (m * vpp + p - 1) * (t_forward + t_backward) / vpp
    if name in SPLIT_BACKWARD:
        tw = t_backward / 2 if t_weight is None else t_weight
        if m < p:
            return (m + p - 1) * (t_forward + t_backward - tw) + tw
        return m * (t_forward + t_backward) + (p - 1) * (t_forward + t_backward - 2 * tw)
    return (m + p - 1) * (t_forward + t_backward)


def bubble_fraction(stages: int, microbatches: int, name: str = "1f1b", vpp: int = 1) -> float:
    """The share of each rank's step spent idle in that ideal step: (p-1)/(m+p-1) for 1F1B
    and GPipe, (p-1)/(v·m+p-1) interleaved, (p-1)/(3m+p-1) for ZB-H1 with tf = tB = tW."""
    ideal = ideal_time(stages, microbatches, 1.0, 2.0, name, vpp, t_weight=1.0)
    return (ideal - microbatches * 3.0) / ideal  # one rounding: (p-1)/(m+p-1) exactly for 1F1B
