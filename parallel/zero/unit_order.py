"""Which ZeRO-3 unit runs next: what the sharded parameters prefetch.

`ShardedParams` issues a unit's all-gather while the unit before it computes, so it must
know which unit comes next before it runs. Two sources say so:

* the order units ran in, learned as they run: in each phase (forward, backward), which
  unit followed the pair of units before it (a tied embedding runs twice per forward, as
  the embedding and as the head, so the unit before disambiguates which use this is);
* the pipeline executor, which knows its plan: before each action it says which action
  this is and which action runs units next (`begin`). The learned order cannot see a
  switch between actions — after a forward, is the next unit the next microbatch's first
  forward unit, or the first unit of a backward? — the plan can. After the first step the
  units each kind of action (F or B of a chunk) runs are known, in order, so within an
  action the next of them is prefetched, and at its last unit the next action's first;
  when that is the same unit (the
  head's forward is followed by its backward, the first stage's last backward by its
  next forward) the unit stays gathered across the switch instead of being freed and
  gathered again, as FSDP keeps its root unit.

Without an executor (a plain forward and backward) the learned order alone decides, and a
switch between phases is not prefetched.
"""

from __future__ import annotations

Action = tuple[str, int]  # (kind: "F" forward or "B" backward, virtual-stage chunk)
PHASE = {"F": "forward", "B": "backward"}


class UnitOrder:
    """Learned unit order plus the executor's plan: the unit to prefetch after each one."""

    def __init__(self) -> None:
        self.order: list[str] = []  # units in the order the first forward ran them
        # (unit before, unit) -> the unit that came next, per phase
        self._after: dict[str, dict[tuple[str | None, str], str]] = {"forward": {}, "backward": {}}
        self._key: dict[str, tuple[str | None, str] | None] = {"forward": None, "backward": None}
        self._units: dict[Action, list[str]] = {}  # the units an action of this kind and chunk runs
        self._action: Action | None = None  # the executor's action running now
        self._following: Action | None = None  # the next action that runs units, if any
        self._ran: list[str] = []  # units the current action has run so far

    def begin(self, action: Action, following: Action | None) -> None:
        """The executor starts `action`; `following` is the next one that runs units (None:
        the last of the step). A W (weight gradients from stored tensors) runs no unit."""
        if self._action is not None and self._ran:
            self._units[self._action] = self._ran
        self._action, self._following, self._ran = action, following, []

    def advance(self, phase: str, name: str) -> tuple[str | None, bool]:
        """Unit `name` runs now in `phase`: ``(the unit expected next, whether it belongs to
        the next action)``. At an action's last unit the next action decides, and nothing is
        expected after the step's last action."""
        if phase == "forward" and name not in self.order:
            self.order.append(name)
        before = self._key[phase]
        if before is not None:
            self._after[phase][before] = name
        key = (before[1] if before is not None else None, name)
        self._key[phase] = key
        ahead = self._after[phase].get(key)
        if self._action is None or PHASE.get(self._action[0]) != phase:
            return ahead, False
        self._ran.append(name)
        known = self._units.get(self._action)
        if known is None or self._ran != known[: len(self._ran)]:  # not learned yet, or not as learned
            return ahead, False
        if len(self._ran) < len(known):
            return known[len(self._ran)], False
        nxt = self._units.get(self._following) if self._following is not None else None
        return (nxt[0] if nxt else None), True
