"""`trident bench init`: one tensor-parallel shard's parameter init, whole tensors vs streamed.

For a config at tp ranks (simulated: rank r's shard is built in one process, no process
group, nothing communicated) it times `init_parameters` and reads the process's peak RSS,
each mode in a fresh process so the peaks do not mix:

    whole      every global tensor drawn whole, then sliced (trident before issue 19)
    streamed   only this rank's slice drawn, through 16 MB of scratch (the default)

Both give bitwise the same shard (tests/test_init_memory.py); the figures say what the
streamed init saves in time and host memory. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "init", help="one tp shard's parameter init: whole global tensors vs streamed slices (seconds, peak RSS)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default="configs/llama-1b.yaml", help="model config (YAML)")
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--ranks", default="0", help="comma-separated tp ranks to build, one after another")
    parser.add_argument("--layers", type=int, default=None, help="override model.n_layers (a smaller run)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    ranks = [int(r) for r in args.ranks.split(",")]
    print(f"init of {args.config} at tp={args.tp}, ranks {ranks} built one after another in one process each mode")
    print(f"{'mode':<10} {'rank':>4} {'shard MB':>9} {'largest full MB':>16} {'init s':>8} {'peak RSS MB':>12} "
          f"{'RSS before init MB':>19}")
    ctx = mp.get_context("spawn")
    for mode in ("whole", "streamed"):
        with ctx.Pool(1) as pool:
            for row in pool.apply(_measure, (args.config, args.tp, ranks, args.layers, args.seed, mode)):
                print(f"{mode:<10} {row[0]:>4} {row[1]:>9.0f} {row[2]:>16.0f} {row[3]:>8.2f} {row[4]:>12.0f} "
                      f"{row[5]:>19.0f}")
    print("peak RSS is the process's high-water mark (ru_maxrss): the shard, the scratch and python+torch")
    return 0


def _measure(config: str, tp: int, ranks: list[int], layers: int | None, seed: int, mode: str) -> list[tuple]:
    """In a fresh process: build each rank's shard, time its init, read the peak RSS."""
    import torch

    from trident.model.gpt import GPT
    from trident.parallel.tensor.sharding import SCRATCH_ELEMENTS, init_parameters, iter_pieces
    from trident.parallel.topology import Layout, Topology
    from trident.training.config import load_config

    cfg = load_config(config, [f"model.n_layers={layers}"] if layers else []).model
    chunk = SCRATCH_ELEMENTS if mode == "streamed" else 1 << 62
    rows = []
    for rank in ranks:
        topo = Topology(layout=Layout(tp=tp, pp=1, dp=1), rank=rank, device=torch.device("cpu"))
        model = GPT(cfg, topo)
        shard_mb = sum(p.numel() for p in model.parameters()) * 4 / 1e6
        largest = max(torch.Size(piece.global_shape).numel() for *_, piece in iter_pieces(model)) * 4 / 1e6
        before = _peak_mb()
        t = time.perf_counter()
        init_parameters(model, seed, chunk=chunk)
        rows.append((rank, shard_mb, largest, time.perf_counter() - t, _peak_mb(), before))
        del model
    return rows


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes
