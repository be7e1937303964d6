"""Model FLOPs, MFU, and the metrics file.

FLOPs per token (forward + backward, no recomputation counted), following the PaLM
appendix B / Megatron accounting: every weight matrix costs 2 FLOPs per parameter per
token forward and 4 backward, i.e. ``6 * N`` with N the parameters that take part in
matmuls (all layers' linears plus the output head; embedding lookups are free); attention
scores and the weighted sum of values add ``12 * n_layers * hidden * seq_len`` (a full,
unmasked s x s, as Megatron and nanoGPT count it).

MFU divides the achieved model FLOP/s per device by the device's peak. Peaks come from
the table below (dense, no sparsity, for the dtype in use; vendors' datasheets), or from
`log.peak_tflops`, or -- on a CPU or an unknown device -- from a measured matmul rate,
which is labelled as measured in the record.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

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
    """Training FLOPs (forward + backward) per token of the whole model."""
    matmul_params = cfg.num_parameters(include_embedding=False) + cfg.vocab_size * cfg.hidden
    return 6.0 * matmul_params + 12.0 * cfg.n_layers * cfg.hidden * seq_len


def declared_peak_tflops(device: torch.device, dtype: str) -> float | None:
    """The table's peak for this CUDA device and dtype, or None when it is not listed."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks.get(dtype)
    return None


def measured_peak_tflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024) -> float:
    """Achieved TFLOP/s of a large matmul on this device: the practical ceiling of a CPU."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.3:
        a @ b
        reps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2.0 * n**3 * reps / (time.perf_counter() - start) / 1e12


def device_peak_tflops(device: torch.device, dtype: str, configured: float = 0.0) -> tuple[float, str]:
    """Peak TFLOP/s of one device for MFU, and where the figure came from.

    `configured` (``log.peak_tflops``) wins; then the declared table; then a measured
    matmul in the compute dtype (fp32 on a CPU, whose bf16 matmuls are emulated).
    """
    if configured > 0:
        return configured, "config"
    declared = declared_peak_tflops(device, dtype)
    if declared is not None:
        return declared, "table"
    compute = torch.float32 if device.type == "cpu" else {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
    return measured_peak_tflops(device, compute), "measured matmul"


class MetricsWriter:
    """Appends one JSON object per record to RUN_DIR/metrics.jsonl (rank 0 only), and
    mirrors scalars to TensorBoard when asked and installed."""

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = False) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError(
                    "log.tensorboard=true needs the tensorboard package: pip install 'trident[tensorboard]'"
                ) from err
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
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


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
