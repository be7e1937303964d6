"""Run a benchmark's measurement on a few local gloo processes and bring rank 0's result back.

The benchmarks that need several ranks on one machine (`trident bench zero`, `trident
bench memory`) start them the same way: spawn `world` processes, join them in a gloo
group through a file store in a temporary folder, run ``fn(world, config)`` on each
with one torch thread (the ranks share the cores), and read back what rank 0 returned,
as JSON.
"""

from __future__ import annotations

import datetime
import json
import tempfile
from pathlib import Path
from typing import Any, Callable


def run_on_local_ranks(fn: Callable[[int, dict], Any], world: int, config: dict) -> Any:
    """``fn(world, config)`` on `world` local gloo ranks; rank 0's JSON-able result."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="trident-bench-") as tmp:
        mp.start_processes(_rank_main, args=(fn, world, config, tmp), nprocs=world, start_method="spawn")
        return json.loads((Path(tmp) / "result.json").read_text())


def _rank_main(rank: int, fn: Callable[[int, dict], Any], world: int, config: dict, tmp: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600)
    )
    try:
        result = fn(world, config)
        if rank == 0:
            (Path(tmp) / "result.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
