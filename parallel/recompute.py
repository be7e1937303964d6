"""Activation recomputation (checkpointing) that replays every random stream exactly.

`checkpoint(fn, *args, rng=streams)` runs ``fn(*args)`` without keeping its intermediate
activations: only the tensor arguments are saved, and in backward ``fn`` runs again, with
gradients on, to rebuild them. For the recomputed forward to be the same forward, every
generator it draws from must be where it was the first time:

* the default CPU generator (and the CUDA one when the streams live on a GPU), which
  ``torch.utils.checkpoint(preserve_rng_state=True)`` would restore too;
* the named `RNGStreams` states (``replicated``, ``tp``), which it would not: `fork`
  swaps them into the default generator only while a dropout runs and keeps them in a
  dict otherwise. They are snapshotted at forward and restored around the recomputation
  (Megatron's ``CheckpointFunction`` does the same with its CUDA RNG tracker).

Around the recomputation the generators are put back to where backward found them, so
the forward of the next microbatch (1F1B interleaves them) draws what it would have
drawn without recomputation.

This is the reentrant form (an autograd Function that calls backward on the rebuilt
graph), as in Megatron. Consequences, all harmless for the transformer blocks it wraps:

* ``fn`` must be a pure function of its arguments and the module parameters it uses;
  tensors captured by a closure are treated as constants (no gradient reaches them), so
  pass every activation it needs as an argument.
* Use ``loss.backward()`` / ``torch.autograd.backward`` (not ``torch.autograd.grad``).
* When no tensor argument requires a gradient, the output could not carry one back to
  the parameters inside ``fn``, so ``fn`` then simply runs without checkpointing.

Saved-tensor hooks that are active when backward runs (the memory tracker of
`trident.training.memory`) see the recomputed activations too, so measured peaks are
honest about the transient memory recomputation costs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from trident.parallel.random import RNGStreams


class _RNGSnapshot:
    """Default generator states (CPU, and the CUDA device's) plus the named streams."""

    def __init__(self, rng: RNGStreams | None, device: torch.device | None) -> None:
        self.rng = rng
        self.cuda = device if device is not None and device.type == "cuda" else None
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(self.cuda) if self.cuda is not None else None
        self.streams = rng.state_dict() if rng is not None else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu_state)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda_state, self.cuda)
        if self.rng is not None:
            self.rng.load_state_dict(self.streams)


class _Checkpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, rng, device, spec, *tensors):  # type: ignore[override]
        ctx.fn, ctx.spec = fn, spec
        ctx.snapshot = _RNGSnapshot(rng, device)
        ctx.save_for_backward(*tensors)
        with torch.no_grad():
            return fn(*_merge(spec, tensors))

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError("checkpointed activations are recomputed only by .backward(), not by torch.autograd.grad()")
        saved = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in saved]
        now = _RNGSnapshot(ctx.snapshot.rng, ctx.snapshot.cuda)
        ctx.snapshot.restore()
        try:
            with torch.enable_grad():
                out = ctx.fn(*_merge(ctx.spec, inputs))
        finally:
            now.restore()
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        del out, outs, pairs
        input_grads = tuple(x.grad if x.requires_grad else None for x in inputs)
        return (None, None, None, None) + input_grads


def _split(args: tuple[Any, ...]) -> tuple[list[Any], list[torch.Tensor]]:
    """Positional arguments as a spec (tensors replaced by a marker) and the tensors."""
    spec, tensors = [], []
    for a in args:
        if isinstance(a, torch.Tensor):
            spec.append(_TENSOR)
            tensors.append(a)
        else:
            spec.append(a)
    return spec, tensors


def _merge(spec: list[Any], tensors: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> list[Any]:
    it = iter(tensors)
    return [next(it) if a is _TENSOR else a for a in spec]


_TENSOR = object()


def checkpoint(fn: Callable[..., Any], *args: Any, rng: RNGStreams | None = None) -> Any:
    """``fn(*args)``, keeping only the tensor arguments for backward and recomputing the rest.

    `rng`: the named dropout streams ``fn`` may fork (None when it draws only from the
    default generator). Non-tensor arguments (None, ints) are passed through as they are.
    Returns what ``fn`` returns: a tensor or a tuple of tensors.
    """
    spec, tensors = _split(args)
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
        return fn(*args)
    device = rng.device if rng is not None else tensors[0].device
    return _Checkpoint.apply(fn, rng, device, spec, *tensors)
