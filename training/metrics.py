"""Model FLOPs, MFU, and the metrics file.

FLOPs per token (forward + backward, no recomputation counted), following the PaLM
appendix B / Megatron accounting: every weight matrix costs 2 FLOPs per parameter per
token forward and 4 backward, i.e. ``6 * N`` with N the parameters that take part in
matmuls (all layers' linears plus the output head; embedding lookups are free); attention
scores and the weighted sum of values add ``12 * n_layers * hidden * seq_len`` (a full,
unmasked s x s, as Megatron and nanoGPT count it).

MFU divides the achieved model FLOP/s per device by the device's peak. Peaks come from
the table below (dense, no sparsity, for the dtype in use; vendors' datasheets), or from
`log.peak_tflops`, or -- on a CPU or an unknown device -- from a measured matmul rate
(once per process, the best of a few sizes), which is never below the rate a step
achieved. Every mfu goes through `model_flops_utilization`, which refuses values above
1.0, and the peak's source ("declared H100 bf16", "measured CPU float32 matmul", ...) is
named next to it.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from trident.model.config import ModelConfig

# Dense peak TFLOP/s by device name substring and dtype. Sources: NVIDIA datasheets
# (H100 SXM5, H200 SXM, A100 SXM4 80GB, L4, A10, V100 SXM2), AMD MI300X datasheet.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2},
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "MI300X": {"bf16": 1307.0, "fp16": 1307.0, "fp32": 163.4},
}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token of the whole model (MoE: the active
    parameters, k of E routed experts plus the shared ones and the router)."""
    matmul_params = cfg.num_parameters(include_embedding=False, active=True) + cfg.vocab_size * cfg.hidden
    return 6.0 * matmul_params + 12.0 * cfg.n_layers * cfg.hidden * seq_len


def declared_peak_tflops(device: torch.device, dtype: str) -> tuple[float, str] | None:
    """The table's peak for this CUDA device and dtype and its name, or None when not listed."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if key in name and dtype in peaks:
            return peaks[dtype], f"declared {key} {dtype}"
    return None


# measured peaks, once per process: (device, dtype) -> TFLOP/s
_MEASURED: dict[tuple[str, torch.dtype], float] = {}
MEASURE_SIZES = (512, 1024, 1536, 2048)


def _matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 3) -> float:
    """Best TFLOP/s over `repeats` timings of an n x n matmul, after a warm-up."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    inner = max(1, (1024 // n) ** 3)  # small sizes: several products per timing
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / inner)
    return 2.0 * n**3 / best / 1e12


def measured_peak_tflops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Best achieved TFLOP/s of square matmuls on this device: the practical ceiling of a CPU.

    Sizes grow through `MEASURE_SIZES` while the rate still improves by over 2%; each size is warmed
    up and timed several times, and the best timing counts. Measured once per process.
    """
    key = (str(device), dtype)
    if key not in _MEASURED:
        best = 0.0
        for n in MEASURE_SIZES:
            rate = _matmul_rate(device, dtype, n)
            improved = rate > 1.02 * best
            best = max(best, rate)
            if not improved:
                break  # the rate has levelled off (or fallen: past the caches' best size)
        _MEASURED[key] = best
    return _MEASURED[key]


def measured_peak_by_rank0(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """`measured_peak_tflops` timed by global rank 0 alone and broadcast to every rank.

    Ranks sharing a machine would otherwise time their matmuls against each other: the
    figure would measure their contention, and the start-up would pay a few seconds of
    matmuls once per rank (8 ranks on 2 cores: ~15 s). Every rank must call it."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return measured_peak_tflops(device, dtype)
    value = torch.zeros(1, dtype=torch.float64, device=device)
    if dist.get_rank() == 0:
        value.fill_(measured_peak_tflops(device, dtype))
    dist.broadcast(value, src=0)
    _MEASURED[(str(device), dtype)] = float(value.item())
    return _MEASURED[(str(device), dtype)]


def device_peak_tflops(
    device: torch.device, dtype: str, configured: float = 0.0, achieved: float = 0.0,
    measure: Callable[[torch.device, torch.dtype], float] | None = None,
) -> tuple[float, str]:
    """Peak TFLOP/s of one device for MFU, and where the figure came from.

    `configured` (``log.peak_tflops``) wins; then the declared table ("declared H100
    bf16"); then a measured matmul in the compute dtype (fp32 on a CPU, whose bf16 matmuls
    are emulated), which is never reported below `achieved`, the rate a step reached.
    `measure` times it (default `measured_peak_tflops`; a trainer's ranks use
    `measured_peak_by_rank0`).
    """
    if configured > 0:
        return configured, "configured log.peak_tflops"
    declared = declared_peak_tflops(device, dtype)
    if declared is not None:
        return declared
    compute = torch.float32 if device.type == "cpu" else {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
    kind = "CPU" if device.type == "cpu" else f"{device.type} (not in the declared table)"
    source = f"measured {kind} {str(compute).removeprefix('torch.')} matmul"
    key = (str(device), compute)
    peak, source = _floor_measured((measure or measured_peak_tflops)(device, compute), source, achieved)
    _MEASURED[key] = peak  # the best rate seen on this device, from here on
    return peak, source


_RAISED = ", raised to a step's achieved rate"


def _floor_measured(peak: float, source: str, achieved: float) -> tuple[float, str]:
    """A measured peak is only a lower bound of the machine's rate: never below `achieved`."""
    if achieved > peak:
        return achieved, source if source.endswith(_RAISED) else source + _RAISED
    return peak, source


def model_flops_utilization(achieved_tflops: float, peak_tflops: float, peak_source: str) -> tuple[float, float, str]:
    """(mfu, peak, peak source) of a step that reached `achieved_tflops` per device.

    A measured peak is first raised to at least the achieved rate (a measured matmul is a
    lower bound of what the machine can do). mfu above 1.0 after that is a bug -- a declared
    or configured peak below what the device did, or wrong FLOP accounting -- and raises.
    """
    if not math.isfinite(achieved_tflops) or achieved_tflops < 0:
        raise ValueError(f"achieved TFLOP/s must be finite and >= 0, got {achieved_tflops}")
    if not peak_tflops > 0:
        raise ValueError(f"peak TFLOP/s must be > 0, got {peak_tflops} ({peak_source})")
    if peak_source.startswith("measured"):
        peak_tflops, peak_source = _floor_measured(peak_tflops, peak_source, achieved_tflops)
    mfu = achieved_tflops / peak_tflops
    if mfu > 1.0:
        raise ValueError(
            f"mfu {mfu:.3f} > 1.0: {achieved_tflops:.4g} TFLOP/s achieved per device against a peak of "
            f"{peak_tflops:.4g} ({peak_source}); the peak or the FLOP count is wrong"
            + (" (set log.peak_tflops to the device's real peak)" if peak_source.startswith("configured") else "")
        )
    return mfu, peak_tflops, peak_source


class MetricsWriter:
    """Appends one JSON object per record to RUN_DIR/metrics.jsonl (rank 0 only), and
    mirrors scalars to TensorBoard when asked and installed.

    `start_step` is the step the run continues from (a resumed checkpoint's, else 0):
    records of later steps, written by a run that went further before it stopped, are
    dropped first (those steps are about to be re-run), and a record of `start_step`
    itself that the file already holds is not written again (a run resumed at its last
    step validates once more), so the file never holds two records of one step."""

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = False, start_step: int = 0) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.start_step = start_step
        self._kept: set[str] = set()  # kinds of record the file already holds for start_step
        if enabled and self.path.exists():
            self._truncate(start_step)
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError(
                    "log.tensorboard=true needs the tensorboard package: pip install 'trident[tensorboard]'"
                ) from err
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def _truncate(self, start_step: int) -> None:
        """Keep the records up to `start_step` (rewritten whole, then renamed over the file)."""
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and _step_of(line) <= start_step]
        self._kept = {_kind(json.loads(line)) for line in kept if _step_of(line) == start_step}
        if len(kept) == len(lines):
            return
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled or (record.get("step") == self.start_step and _kind(record) in self._kept):
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = int(record.get("step", 0))
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _kind(record: dict[str, Any]) -> str:
    """Which of a step's records this is: its training record or its validation record."""
    return "val" if "val_loss" in record else "train" if "loss" in record else ",".join(sorted(record))


def _step_of(line: str) -> int:
    """A record's step; a line that is not a JSON record (a write cut short) counts as later."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
