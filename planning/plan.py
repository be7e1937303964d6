"""What a prediction takes and what it gives: `Settings` in, `StagePlan` and `Plan` out.

These are plain records, kept apart from the arithmetic so that the memory model
(`trident.planning.plan_memory`, `trident.planning.plan_pipeline`), the cost model
(`trident.planning.plan_cost`) and the planner that composes them (`trident.planning.planner`) can all name them without
importing one another. The derived figures a reader of `trident plan` sees (peak bytes,
tokens/s, MFU, whether a layout fits) are properties here, computed from the records.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trident.planning.devices import Device
from trident.planning.plan_pipeline import ActivationBytes
from trident.planning.plan_state import StateBytes


@dataclass(frozen=True)
class Settings:
    """Everything a prediction depends on besides the model config."""

    tp: int
    pp: int
    dp: int
    zero: int
    recompute: str
    micro_batch_size: int
    seq_len: int
    global_batch_size: int
    sequence_parallel: bool
    dtype: str
    schedule: str = "1f1b"  # parallel.pp_schedule
    vpp: int = 1  # virtual stages (chunks) per pipeline rank
    split: tuple[int, ...] | None = None
    bucket_mb: float = 25.0
    doc_masking: bool = True
    overlap_grad_reduce: bool = True
    zero3_reshard_after_forward: bool = True  # ZeRO-3: free gathered units after each forward
    cp: int = 1  # context-parallel size: each cp rank holds seq_len/cp tokens of every sample
    ep: int = 1  # expert-parallel size: E/ep experts per MoE layer on a rank, carved out of dp

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @property
    def dp_cp(self) -> int:
        """The ranks that hold the same weights: gradients are reduced, and ZeRO shards,
        over dp·cp (cp ranks see other tokens of the same samples)."""
        return self.dp * self.cp

    @property
    def edp(self) -> int:
        """The ranks holding the same experts (ep > 1): expert gradients are reduced, and
        ZeRO shards, over dp/ep (cp is 1 under expert parallelism)."""
        return self.dp // self.ep

    @property
    def local_seq(self) -> int:
        """Tokens of each sample on one rank (its 2 load-balanced chunks under cp)."""
        return self.seq_len // self.cp

    @property
    def microbatches(self) -> int:
        """cp ranks share their samples, so cp does not enter the batch arithmetic."""
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    @property
    def sp(self) -> bool:
        return self.sequence_parallel and self.tp > 1


@dataclass
class StagePlan:
    """One rank of pipeline stage `stage` (every tp and dp rank of a stage holds the same)."""

    stage: int
    chunks: tuple[range, ...]  # its layers, one range per virtual stage (one without interleaving)
    state: StateBytes
    activations: ActivationBytes

    @property
    def layers(self) -> list[int]:
        return [i for chunk in self.chunks for i in chunk]

    @property
    def param_bytes(self) -> int:
        return self.state.param_bytes

    @property
    def grad_bytes(self) -> int:
        return self.state.grad_bytes

    @property
    def optimizer_bytes(self) -> int:
        return self.state.optimizer_bytes

    @property
    def activation_bytes(self) -> int:
        return self.activations.peak

    @property
    def measurable_bytes(self) -> int:
        """What a rank's `MemoryReport.total_bytes` measures: state plus saved activations."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes

    @property
    def peak_bytes(self) -> int:
        """The step's peak: the full gradient buffer during backward, the W closures of a
        split backward, the transfers the pipeline executor holds besides, and (cp > 1) the
        ring attention's blocks in flight."""
        return (self.state.param_peak_bytes + self.state.grad_peak_bytes + self.optimizer_bytes
                + self.activation_bytes + self.buffer_bytes)

    @property
    def buffer_bytes(self) -> int:
        """Transfers held besides autograd's saved tensors: pipeline and ring."""
        return self.activations.pipeline_buffer + self.activations.ring_buffer


@dataclass
class Plan:
    settings: Settings
    device: Device
    stages: list[StagePlan]
    model_flops: float  # per step, whole job, no recomputation (what MFU counts)
    hardware_flops: float  # per step, whole job, with recomputation
    comm_bytes: dict[str, float]  # bytes one rank sends per step, by group (the busiest rank)
    step_time_s: float
    breakdown: dict[str, float] = field(default_factory=dict)  # seconds, by part

    @property
    def peak_bytes(self) -> int:
        return max(s.peak_bytes for s in self.stages)

    @property
    def tokens_per_s(self) -> float:
        return self.settings.global_batch_size * self.settings.seq_len / self.step_time_s

    @property
    def mfu(self) -> float:
        peak = self.device.peak_tflops(self.settings.dtype) * 1e12
        return self.model_flops / (self.step_time_s * self.settings.world * peak)

    def fits(self, memory_bytes: int) -> bool:
        return self.peak_bytes <= memory_bytes
