"""How long torch.compile has spent compiling in this process, so that step times exclude it.

With `train.compile` the first step that meets a block compiles it: Dynamo traces the
forward and Inductor builds its kernels during the forward, and the backward graph is
compiled lazily during the first backward. That step can take tens of seconds on a CPU
(a C++ compiler runs) while the steady step takes a fraction of one, so counting it as a
training step would report a throughput no later step has. torch keeps a per-phase timer
table (`torch._dynamo.utils.compilation_time_metrics`); the two top-level phases below
contain every nested one, so their sum is the compile time and nothing is counted twice
(the backward compiler runs inside the backward, never inside a forward's compile).

A rank's own compile time is not the step's lost time: under pipeline parallelism stage 1
compiles only after stage 0's compiled forward has sent it activations, and every rank
waits for the slowest in the gradient reduction. So a step in which any rank compiled is
a *compile step*: its whole wall time is reported as `compile_s`, and it has no step time,
tokens/s or MFU (no steady step looks like it). Whether any rank compiled is one all-reduce
of a flag per step, made only when `train.compile` is on.
"""

from __future__ import annotations

from torch._dynamo.utils import compilation_time_metrics

from trident.parallel.collectives import any_rank
from trident.parallel.topology import Topology

# Top-level timers: a frame's compile (Dynamo + AOTAutograd + the forward's Inductor build)
# and the lazily compiled backward graph.
_FORWARD = "_compile.compile_inner"
_BACKWARD = "compile_fx.<locals>.bw_compiler"
TIMING_KEYS = ("tokens_per_s", "step_time_s", "tflops", "mfu")  # what a compile step's record leaves out


def compile_seconds() -> float:
    """Seconds spent compiling in this process so far (0.0 before anything compiled)."""
    return float(sum(compilation_time_metrics.get(_FORWARD, ())) + sum(compilation_time_metrics.get(_BACKWARD, ())))


class CompileClock:
    """Tells compile steps from training steps.

    `start()` before a step; `compiled(dt, topo)` after it says whether any rank compiled
    during it (always False with compile off: no collective then). `take()` gives the
    compile steps' seconds since the last metrics record (`{"compile_s": ...}` or nothing);
    `first_report(step)` the one log line, once, after the first compile step.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.mark = self.own = self.total = self.unrecorded = 0.0
        self.reported = False

    def start(self) -> None:
        self.mark = compile_seconds() if self.enabled else 0.0

    def compiled(self, dt: float, topo: Topology) -> bool:
        if not self.enabled:
            return False
        spent = compile_seconds() - self.mark
        if not any_rank(spent > 0, topo):
            return False
        self.own += spent
        self.total += dt
        self.unrecorded += dt
        return True

    def take(self) -> dict[str, float]:
        spent, self.unrecorded = self.unrecorded, 0.0
        return {"compile_s": spent} if spent > 0 else {}

    def first_report(self, step: int) -> str | None:
        if self.reported or self.total == 0.0:
            return None
        self.reported = True
        return (f"torch.compile: step {step} took {self.total:.1f} s with compiling ({self.own:.1f} s on this rank); "
                f"compile steps are left out of step times, tokens/s and MFU (compile_s in metrics.jsonl)")
