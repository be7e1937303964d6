"""Learning-rate schedules: linear warm-up, then cosine, linear, constant or WSD decay.

The schedule is a pure function of the number of optimizer steps actually taken, so a
skipped step (fp16 overflow) does not advance it, and its only state is that count.
"""

from __future__ import annotations

import math

from trident.errors import UserError

LR_SCHEDULES = ("cosine", "linear", "constant", "wsd")


class LRSchedule:
    def __init__(
        self,
        lr: float,
        min_lr: float,
        warmup_steps: int,
        total_steps: int,
        kind: str = "cosine",
        decay_fraction: float = 0.2,
    ) -> None:
        if kind not in LR_SCHEDULES:
            raise UserError(f"optim.schedule is {kind!r}; valid values are {', '.join(LR_SCHEDULES)}")
        self.lr, self.min_lr, self.kind = lr, min_lr, kind
        self.warmup, self.total, self.decay_fraction = warmup_steps, max(total_steps, 1), decay_fraction
        self.steps_taken = 0

    def lr_at(self, step: int) -> float:
        """LR for the `step`-th optimizer step (1-based)."""
        if self.warmup > 0 and step <= self.warmup:
            return self.lr * step / self.warmup
        if self.kind == "constant":
            return self.lr
        if self.kind == "wsd":
            decay_steps = max(1, round(self.decay_fraction * self.total))
            decay_start = self.total - decay_steps
            if step <= decay_start:
                return self.lr
            progress = min(1.0, (step - decay_start) / decay_steps)
            return self.lr - (self.lr - self.min_lr) * progress
        span = max(1, self.total - self.warmup)
        progress = min(1.0, max(0.0, (step - self.warmup) / span))
        if self.kind == "linear":
            return self.lr - (self.lr - self.min_lr) * progress
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    @property
    def current(self) -> float:
        """The LR the next step will use."""
        return self.lr_at(self.steps_taken + 1)

    def advance(self) -> None:
        self.steps_taken += 1

    def state_dict(self) -> dict[str, int]:
        return {"steps_taken": self.steps_taken}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.steps_taken = int(state["steps_taken"])
