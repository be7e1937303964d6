"""The accelerators a plan is priced on, and the byte sizes users write.

`Device` holds one accelerator's declared figures (memory, HBM and link bandwidths,
devices per node) from vendor datasheets; its dense peak FLOP/s come from
`trident.training.metrics.PEAK_TFLOPS`, the table MFU divides by, so a plan's MFU and a
run's MFU mean the same thing. These figures are kept apart from the planner because
they are data, not arithmetic: adding a device is one line here.

`parse_bytes` and `format_bytes` read and print sizes as `trident plan` takes and shows
them (``80GB`` is 10^9 bytes, ``80GiB`` 2^30).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from trident.errors import UserError
from trident.training.metrics import PEAK_TFLOPS

CPU_NOMINAL_TFLOPS = 1.0  # a nominal figure for the CPU entry; measure with `trident bench`


@dataclass(frozen=True)
class Device:
    """Declared figures of one accelerator and its links (vendor datasheets)."""

    name: str
    memory_bytes: int
    hbm_gbps: float  # memory bandwidth, GB/s
    intra_gbps: float  # per-device bandwidth to a peer in the same node, one direction, GB/s
    inter_gbps: float  # per-device network bandwidth across nodes, one direction, GB/s
    per_node: int  # devices per node
    latency_us: float = 10.0  # fixed cost of one collective or transfer
    kind: str = "cuda"  # what the activation accounting assumes (kernels, dropout masks)
    matmul_efficiency: float = 0.75  # the fraction of peak that large dense matmuls reach

    def peak_tflops(self, dtype: str) -> float:
        """The declared dense peak (`trident.training.metrics.PEAK_TFLOPS`), what MFU divides by."""
        peaks = PEAK_TFLOPS.get(self.name, {})
        return peaks.get(dtype) or peaks.get("fp32") or CPU_NOMINAL_TFLOPS


# H100/H200 SXM: 900 GB/s NVLink (450 each way), 3.35 / 4.8 TB/s HBM, 400 Gb/s NDR per GPU.
# A100 SXM4 80GB: 600 GB/s NVLink (300 each way), 2.04 TB/s HBM, 200 Gb/s HDR per GPU.
DEVICES: dict[str, Device] = {
    "H100": Device("H100", 80 * 10**9, 3350.0, 450.0, 50.0, 8),
    "H200": Device("H200", 141 * 10**9, 4800.0, 450.0, 50.0, 8),
    "A100": Device("A100", 80 * 10**9, 2039.0, 300.0, 25.0, 8),
    "cpu": Device("cpu", 64 * 10**9, 50.0, 10.0, 10.0, 1, latency_us=50.0, kind="cpu"),
}


def get_device(name: str) -> Device:
    if name not in DEVICES:
        raise UserError(f"unknown device {name!r}; valid devices are {', '.join(DEVICES)}")
    return DEVICES[name]


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'80GB' (10^9), '80GiB' (2^30), '512MB', '1.5TB' or a plain number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise UserError(f"device memory {text!r} is not a size; write it like 80GB, 80GiB or 512MB")
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
