"""Splitting a backward into B (the input's gradient) and W (the weights' gradients).

Zero-bubble pipeline schedules (`trident.parallel.pipeline.schedule`, ZB-H1) run the
part of a backward that the previous stage waits for, B, as soon as they can, and the
weight-gradient part, W, later, in what would otherwise be a bubble (Qi et al., "Zero
Bubble Pipeline Parallelism", 2024). The hand-written linears own their backward
(`trident.parallel.tensor.layers`, `lean_linear`), so they can do the split themselves:

* The executor runs a microbatch's forward inside `split_forward()`: linears then use
  their own autograd Functions (not ``F.linear``), whose backward can defer.
* It runs the B inside `deferring(store)`: each such linear computes its input gradient
  now and hands `defer` a closure for its weight gradient (keeping the input and the
  output gradient it needs, as the paper's implementation does).
* The W is ``store.run()``: each closure computes its weight gradient and passes it to
  autograd (``torch.autograd.backward(weight, grad)``), so it lands exactly where an
  ordinary backward would have put it: through the weight's own graph (the summed
  replicated kv heads) into ``.grad`` with its post-accumulate hooks (the fp32 gradient
  buffer). Every weight gradient is therefore seen once, after its W.

Other parameters (norms, biases, embeddings) are cheap and keep their gradients in B.
Outside `deferring`, nothing changes: a deferrable Function computes both gradients.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

_state: dict[str, object] = {"split": False, "store": None, "w": False}
# callbacks told when deferred weight gradients start (+1) and stop (-1) keeping tensors
# alive: an activation meter counts them with autograd's saved tensors (they are plain
# references, which saved-tensor hooks do not see)
_observers: list[Callable[[list[torch.Tensor], int], None]] = []


@contextlib.contextmanager
def observe(callback: Callable[[list[torch.Tensor], int], None]) -> Iterator[None]:
    """Call ``callback(tensors, +1)`` when a deferred W starts keeping `tensors` and
    ``callback(tensors, -1)`` when its W has run, while inside this block."""
    _observers.append(callback)
    try:
        yield
    finally:
        _observers.remove(callback)


class WeightGradStore:
    """The deferred weight-gradient computations of one (chunk, microbatch)'s backward,
    in the order backward produced them."""

    def __init__(self) -> None:
        self.pending: list[tuple[torch.Tensor, Callable[[], torch.Tensor]]] = []
        self.holds: list[torch.Tensor] = []  # what the closures keep alive until the W

    def run(self) -> None:
        """The W pass: compute every deferred weight gradient and accumulate it."""
        pending, self.pending, holds, self.holds = self.pending, [], self.holds, []
        _state["w"] = True
        try:
            for weight, compute in pending:
                with torch.no_grad():  # as inside a backward: no graph of the gradient itself
                    grad = compute()
                torch.autograd.backward(weight, grad)
        finally:
            _state["w"] = False
        del pending
        for callback in list(_observers):
            callback(holds, -1)

    def __len__(self) -> int:
        return len(self.pending)


@contextlib.contextmanager
def split_forward() -> Iterator[None]:
    """Forward passes inside this build graphs whose linears can defer their W."""
    before = _state["split"]
    _state["split"] = True
    try:
        yield
    finally:
        _state["split"] = before


@contextlib.contextmanager
def deferring(store: WeightGradStore) -> Iterator[None]:
    """Backward passes inside this defer deferrable weight gradients into `store` (a
    recomputed forward inside it, under activation recomputation, is split too)."""
    before = _state["split"], _state["store"]
    _state["split"], _state["store"] = True, store
    try:
        yield
    finally:
        _state["split"], _state["store"] = before


def splitting() -> bool:
    """True while a forward should build deferrable linears (`split_forward`)."""
    return bool(_state["split"]) and torch.is_grad_enabled()


def in_split_b() -> bool:
    """True inside a split backward's B (`deferring`): weight gradients are left for a W."""
    return _state["store"] is not None


def in_w() -> bool:
    """True while a W (`WeightGradStore.run`) delivers deferred weight gradients."""
    return bool(_state["w"])


def defer(weight: torch.Tensor, compute: Callable[[], torch.Tensor], holds: tuple[torch.Tensor, ...] = ()) -> bool:
    """Queue ``compute()`` (the gradient of `weight`) for the W pass when a B is being
    deferred, and return True; return False (compute it now) otherwise. `weight` is the
    tensor the Function received (a parameter, or a view whose graph sums replicas)."""
    store = _state["store"]
    if store is None or not weight.requires_grad:
        return False
    store.pending.append((weight, compute))  # type: ignore[union-attr]
    store.holds.extend(holds)  # type: ignore[union-attr]
    for callback in list(_observers):
        callback(list(holds), +1)
    return True
