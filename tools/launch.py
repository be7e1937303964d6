"""Start N local ranks of a trident command through torch's own elastic launcher.

`trident <command> --nproc N ...` outside torchrun re-runs the same command line as N
ranks (``python -m trident <command> ...``) with torchrun's environment, exactly as
``torchrun --standalone --nproc-per-node N -m trident <command> ...`` would. The entry
point is the interpreter, not a Python function, so nothing is pickled across processes.
"""

from __future__ import annotations

import os
import sys
import uuid


def under_launcher() -> bool:
    """True inside a rank started by torchrun (or by `launch_local`)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch_local(nproc: int, argv: list[str], max_restarts: int = 0) -> int:
    """Run ``python -m trident *argv`` as `nproc` ranks on this machine; 0 if all succeeded."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"trident-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port, as torchrun --standalone
        max_restarts=max_restarts,
        monitor_interval=0.2,
    )
    env_threads = os.environ.setdefault("OMP_NUM_THREADS", "1")  # N ranks share the cores
    del env_threads
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "trident", *argv)
    except ChildFailedError as err:
        # each rank has already printed its own error; summarise which ranks failed
        failed = ", ".join(f"rank {r} (exit {f.exitcode})" for r, f in sorted(err.failures.items()))
        print(f"trident: {failed} failed", file=sys.stderr)
        return 1
    return 0
