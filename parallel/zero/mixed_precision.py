"""Parameter/compute dtypes and the dynamic loss scaler for fp16.

The model is built in the compute dtype (``fp32 | bf16 | fp16``); the optimizer keeps
fp32 master weights and accumulates gradients in fp32 whenever that dtype is not fp32
(`trident.parallel.zero.optimizer`). bf16 has fp32's exponent range and needs no scaling;
fp16's narrow range loses small gradients to underflow, so the loss is multiplied by a
large scale before backward and the gradients are divided by it before the step.

Dynamic scaling (as torch's GradScaler and Megatron's DynamicGradScaler): start high;
a step whose gradients hold inf/NaN is skipped and the scale is multiplied by
`backoff_factor`; after `growth_interval` clean steps in a row it is multiplied by
`growth_factor`. The inf/NaN check must agree on every rank (tp, pp and dp) or ranks
would diverge, some stepping and some not; the optimizer gets that agreement for free
from the all-reduce of the global gradient norm (`trident.parallel.zero.clip`), and
`trident.parallel.collectives.any_rank` offers the same for callers without a norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trident.errors import UserError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype for a config name; one sentence naming the valid names otherwise."""
    if name not in DTYPES:
        raise UserError(f"dtype {name!r} is not supported; valid values are {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise UserError(f"dtype {dtype} is not a training dtype; valid dtypes are {', '.join(DTYPES)}")


@dataclass
class MixedPrecisionConfig:
    dtype: str = "fp32"
    """Parameter and compute dtype: fp32 | bf16 | fp16 (master weights stay fp32)."""
    initial_scale: float = 2.0**16
    """fp16 only: the loss scale at the first step."""
    growth_factor: float = 2.0
    """fp16 only: the scale is multiplied by this after `growth_interval` clean steps."""
    growth_interval: int = 1000
    """fp16 only: clean (all-finite) steps in a row before the scale grows."""
    backoff_factor: float = 0.5
    """fp16 only: the scale is multiplied by this after a step with inf/NaN gradients."""
    min_scale: float = 1.0
    """fp16 only: the scale never backs off below this."""

    def validate(self) -> "MixedPrecisionConfig":
        parse_dtype(self.dtype)
        checks = (
            ("initial_scale", self.initial_scale, self.initial_scale > 0, "a number > 0"),
            ("growth_factor", self.growth_factor, self.growth_factor >= 1, "a number >= 1"),
            ("backoff_factor", self.backoff_factor, 0 < self.backoff_factor < 1, "a number in (0, 1)"),
            ("min_scale", self.min_scale, 0 < self.min_scale <= self.initial_scale, "in (0, initial_scale]"),
        )
        for name, value, ok, valid in checks:
            if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
                raise UserError(f"precision.{name}={value!r} is invalid; it must be {valid}")
        if not isinstance(self.growth_interval, int) or self.growth_interval < 1:
            raise UserError(f"precision.growth_interval={self.growth_interval!r} must be a whole number >= 1")
        return self

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)


class LossScaler:
    """The loss scale and its schedule. Static (scale 1, never changes) unless dynamic.

    `update(found_inf)` is called once per optimizer step, on every rank, with the same
    (globally agreed) flag, so every rank's scaler stays identical.
    """

    def __init__(
        self,
        dynamic: bool,
        initial_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        growth_interval: int = 1000,
        backoff_factor: float = 0.5,
        min_scale: float = 1.0,
    ) -> None:
        self.dynamic = dynamic
        self.scale = float(initial_scale) if dynamic else 1.0
        self.growth_factor = growth_factor
        self.growth_interval = growth_interval
        self.backoff_factor = backoff_factor
        self.min_scale = min_scale
        self.clean_steps = 0  # finite steps since the last growth or backoff
        self.skipped_steps = 0  # total, for the training log

    @classmethod
    def from_config(cls, cfg: MixedPrecisionConfig) -> "LossScaler":
        cfg.validate()
        return cls(
            dynamic=cfg.dtype == "fp16",
            initial_scale=cfg.initial_scale,
            growth_factor=cfg.growth_factor,
            growth_interval=cfg.growth_interval,
            backoff_factor=cfg.backoff_factor,
            min_scale=cfg.min_scale,
        )

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The tensor to call backward on (the loss itself when not scaling)."""
        return loss * self.scale if self.scale != 1.0 else loss

    @property
    def inv_scale(self) -> float:
        return 1.0 / self.scale

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.skipped_steps += 1
        if not self.dynamic:
            return
        if found_inf:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0

    def state_dict(self) -> dict:
        """JSON-able; stored in the checkpoint's metadata file."""
        return {
            "dynamic": self.dynamic,
            "scale": self.scale,
            "clean_steps": self.clean_steps,
            "skipped_steps": self.skipped_steps,
            "growth_factor": self.growth_factor,
            "growth_interval": self.growth_interval,
            "backoff_factor": self.backoff_factor,
            "min_scale": self.min_scale,
        }

    def load_state_dict(self, state: dict) -> None:
        # The schedule's constants come from the current config (a resumed run may change
        # them on purpose); the evolving state comes from the checkpoint. A checkpoint from
        # a run that did not scale (fp32/bf16) leaves a newly dynamic scaler at its start.
        if state.get("dynamic", False) and self.dynamic:
            self.scale = float(state["scale"])
            self.clean_steps = int(state["clean_steps"])
        self.skipped_steps = int(state.get("skipped_steps", 0))

    def __repr__(self) -> str:
        return f"LossScaler(dynamic={self.dynamic}, scale={self.scale}, clean_steps={self.clean_steps})"
