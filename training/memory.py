"""What one rank holds: parameters, gradients, optimizer state, and a step's peak activations.

The persistent state (parameters, gradients, optimizer state) is taken from the
optimizer's ``memory()`` report when it has one (`DistributedOptimizer`: its buckets,
padding and ZeRO sharding included), otherwise counted from the model's parameters.

Activation memory is *measured* over one step, by either of two meters:

* ``saved-tensors`` (CPU, or anywhere on request): every tensor autograd saves for
  backward passes through ``torch.autograd.graph.saved_tensors_hooks``; the meter keeps a
  count of live saved tensors per underlying storage and adds a storage's bytes the first
  time it is saved and removes them when autograd releases the last saved tensor on it
  (after that node's backward). Views and tensors saved by several ops count once.
  Storages of parameters and buffers are not activations and are excluded (under ZeRO-3,
  the gathered units' storages, which the sharded parameters name: `holds`). The peak is
  the maximum of that sum over the whole step, so with a pipeline it covers the
  microbatches in flight under the schedule, and with recomputation the activations
  rebuilt during backward (the reentrant checkpoint saves them through the same hooks).
  What it does not see: temporaries that autograd does not keep (a matmul's output
  before the next op consumes it, gradient buffers during backward, communication
  buffers) and the stage inputs and outputs the pipeline executor holds for backward
  (one [b, s, h] tensor each per microbatch in flight). That is the activation memory
  that scales with microbatches and layers; the transients are one op's worth.
* ``cuda-allocator`` (CUDA): ``torch.cuda.max_memory_allocated`` over the step minus
  the memory allocated when the step began (the persistent state), i.e. everything the
  step added at its peak, temporaries included.

Usage (the trainer does this on the steps it logs; the hooks cost Python calls per
saved tensor, so the other steps run without them)::

    with ActivationMeter(model) as meter:
        run_pipeline(...)          # or any forward/backward
    report = rank_memory(model, optimizer, meter.peak_bytes, meter.source)
    record.update(memory_record(report, topo))   # mem_* fields, with the max over ranks

`trident.planning.plan_memory` predicts the same four numbers from the config alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trident.parallel.collectives import comm_device
from trident.parallel.tensor.weight_grad import observe
from trident.parallel.topology import Topology


@dataclass
class MemoryReport:
    """Bytes one rank holds (the planner predicts the same fields, `planning.planner`)."""

    param_bytes: int
    """Parameters in the model dtype (including bucket padding with a `DistributedOptimizer`)."""
    grad_bytes: int
    """Gradients kept between steps (fp32 main gradients with a `DistributedOptimizer`)."""
    optimizer_bytes: int
    """Optimizer state: exp_avg, exp_avg_sq and fp32 master weights when the model is not fp32."""
    activation_bytes: int
    """Peak activation memory of a step (see the module docstring for how it is measured)."""
    activation_source: str = "saved-tensors"
    """saved-tensors | cuda-allocator | none."""

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes

    def values(self) -> list[int]:
        """[params, grads, optimizer, activations, total]: the order of `METRIC_KEYS`."""
        return [self.param_bytes, self.grad_bytes, self.optimizer_bytes, self.activation_bytes, self.total_bytes]


# the metrics-record keys of `MemoryReport.values()`, in that order
METRIC_KEYS = ("mem_params_bytes", "mem_grads_bytes", "mem_optim_bytes", "mem_activation_peak_bytes", "mem_total_bytes")


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    s = t.untyped_storage()
    return (str(t.device), s.data_ptr())


class _Packed:
    """What autograd stores instead of a saved tensor while the meter is on; releasing it
    (autograd frees the node's saved variables) releases the storage's share."""

    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor: torch.Tensor, key: tuple[str, int] | None, meter: "ActivationMeter") -> None:
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self) -> None:
        if self.key is not None:
            self.meter._release(self.key)


class ActivationMeter:
    """Peak bytes of activations a step keeps for backward (a context manager).

    `model`: its parameters' and buffers' storages are excluded. `mode`: ``auto`` (the
    CUDA allocator on a CUDA device, saved tensors otherwise), ``saved-tensors`` or
    ``cuda-allocator``. After the ``with`` block: `peak_bytes`, `source`; `live_bytes`
    is what is still saved (0 after a complete step).
    """

    def __init__(self, model: nn.Module | None = None, mode: str = "auto", device: torch.device | str | None = None):
        if mode not in ("auto", "saved-tensors", "cuda-allocator"):
            raise ValueError(f"mode {mode!r}; valid modes are auto, saved-tensors, cuda-allocator")
        if device is None and model is not None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if mode == "auto":
            mode = "cuda-allocator" if self.device.type == "cuda" else "saved-tensors"
        self.source = mode
        self._exclude: set[tuple[str, int]] = set()
        if model is not None:
            for t in list(model.parameters()) + list(model.buffers()):
                self._exclude.add(_storage_key(t))
        # ZeRO-3 gathers parameters into new storage each time: ask which those are
        self._units = getattr(model, "unit_hooks", None)
        self._count: dict[tuple[str, int], int] = {}
        self._bytes: dict[tuple[str, int], int] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self.saved_tensors = 0  # tensors packed (with repeats), for diagnostics
        self._hooks: Any = None
        self._deferred: Any = None
        self._held_keys: list[tuple[str, int]] = []
        self._base = 0

    # --- saved-tensor hooks ---------------------------------------------------------------
    def _pack(self, t: torch.Tensor) -> _Packed:
        self.saved_tensors += 1
        return _Packed(t, self._add(t), self)

    @torch.compiler.disable  # bookkeeping on storages: never traced into a compiled block
    def _add(self, t: torch.Tensor) -> tuple[str, int] | None:
        """Count one more holder of `t`'s storage; its key, or None when not counted."""
        key = _storage_key(t)
        if key in self._exclude or key[1] == 0 or self._gathered_weight(t):
            return None
        n = self._count.get(key, 0)
        if n == 0:
            size = t.untyped_storage().nbytes()
            self._bytes[key] = size
            self.live_bytes += size
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self._count[key] = n + 1
        return key

    def _gathered_weight(self, t: torch.Tensor) -> bool:
        return self._units is not None and self._units.holds(t)

    @staticmethod
    def _unpack(packed: _Packed) -> torch.Tensor:
        return packed.tensor

    def _release(self, key: tuple[str, int]) -> None:
        n = self._count[key] - 1
        if n == 0:
            del self._count[key]
            self.live_bytes -= self._bytes.pop(key)
        else:
            self._count[key] = n

    # --- context --------------------------------------------------------------------------
    def __enter__(self) -> "ActivationMeter":
        if self.source == "cuda-allocator":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._hooks.__enter__()
            self._deferred = observe(self._held)  # what split backwards keep for their W
            self._deferred.__enter__()
        return self

    def _held(self, tensors: list[torch.Tensor], sign: int) -> None:
        """A deferred weight gradient keeps (+1) or lets go of (-1) `tensors` (ZB-H1's W)."""
        for t in tensors:
            if sign > 0:
                key = self._add(t)
                if key is not None:
                    self._held_keys.append(key)
            elif (key := _storage_key(t)) in self._held_keys:
                self._held_keys.remove(key)
                self._release(key)

    def __exit__(self, *exc: object) -> None:
        if self.source == "cuda-allocator":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._deferred.__exit__(*exc)
            self._hooks.__exit__(*exc)
            self._hooks = None


# --- persistent state -----------------------------------------------------------------------
def _unique_bytes(tensors: list[torch.Tensor]) -> int:
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        seen[_storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def state_bytes(model: nn.Module, optimizer: object | None = None) -> tuple[int, int, int]:
    """(parameter, gradient, optimizer-state) bytes of this rank.

    From ``optimizer.memory()`` when it exists; else parameters counted by storage,
    gradients as one tensor of the parameter's size and dtype per trainable parameter,
    and a ``torch.optim`` optimizer's state tensors.
    """
    report = getattr(optimizer, "memory", None)
    if callable(report):
        mem = report()
        return int(mem["param_bytes"]), int(mem["grad_bytes"]), int(mem["optimizer_bytes"])
    params = [p for p in model.parameters()]
    param_bytes = _unique_bytes(params)
    grad_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    opt_bytes = 0
    if isinstance(optimizer, torch.optim.Optimizer):
        states = [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        opt_bytes = _unique_bytes([t for t in states if t.numel() > 1]) if states else 0
    return param_bytes, grad_bytes, opt_bytes


def rank_memory(
    model: nn.Module,
    optimizer: object | None = None,
    activation_bytes: int = 0,
    activation_source: str = "saved-tensors",
) -> MemoryReport:
    """This rank's memory report; `activation_bytes` from an `ActivationMeter` over a step."""
    p, g, o = state_bytes(model, optimizer)
    return MemoryReport(p, g, o, int(activation_bytes), activation_source if activation_bytes else "none")


def memory_record(report: MemoryReport, topo: Topology) -> dict[str, Any]:
    """Metrics-record fields: this rank's bytes (``mem_*``), the largest of every rank's
    (``mem_max_*``: the rank that runs out first) and every rank's total, in rank order.

    Collective over the world (one small all-gather): every rank must call it, at the same
    steps, as the trainer's logging does.
    """
    mine = torch.tensor(report.values(), dtype=torch.float64)
    if topo.world > 1:
        device = comm_device(topo)
        gathered = [torch.zeros_like(mine, device=device) for _ in range(topo.world)]
        dist.all_gather(gathered, mine.to(device))
        every = torch.stack([g.cpu() for g in gathered])  # [world, 5]
    else:
        every = mine.unsqueeze(0)
    record: dict[str, Any] = {key: int(v) for key, v in zip(METRIC_KEYS, report.values())}
    record.update({key.replace("mem_", "mem_max_", 1): int(v) for key, v in zip(METRIC_KEYS, every.max(0).values)})
    record["mem_rank_total_bytes"] = [int(v) for v in every[:, -1]]
    record["mem_activation_source"] = report.activation_source
    return record
