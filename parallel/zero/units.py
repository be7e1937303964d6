"""Parameter units: the pieces of a model whose parameters ZeRO-3 gathers as one.

A model that supports fully sharded parameters names its units (one transformer block;
the embedding; the final norm; the output head) and runs each through `run_unit`. With
no hooks installed (ZeRO 0-2, a single process, generation) that is a plain call; under
ZeRO-3 (`trident.parallel.zero.sharded_params.ShardedParams`) the hooks all-gather the
unit's parameters before the call, start gathering the next unit's, free them after it,
and arrange for them to be gathered again when the unit's backward begins. The pipeline
executor tells the hooks which action it starts and which runs units next, so the
prefetch can cross from a forward to a backward and back.

The model names units; it never learns what gathering means, and the sharding code
never learns what a transformer is: this protocol is all they share.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch


class UnitHooks(Protocol):
    def run(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` with unit `name`'s parameters gathered; return its result."""

    def holds(self, t: torch.Tensor) -> bool:
        """Is `t` a view of gathered parameters (not an activation)?"""

    def begin_action(self, action: tuple[str, int], following: tuple[str, int] | None) -> None:
        """The pipeline executor starts `action` (kind "F"/"B"/"W", chunk); `following` is
        the next one that runs units (an F or B), None after the step's last."""


def run_unit(hooks: UnitHooks | None, name: str, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """``fn(*args)``, inside unit `name` when parameter units are sharded (`hooks` given)."""
    if hooks is None:
        return fn(*args)
    return hooks.run(name, fn, *args)

