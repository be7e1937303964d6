"""`trident bench zero`: per-rank memory of ZeRO 0/1/2/3 and step time with and without overlap.

For each data-parallel size it starts that many local gloo processes (pure data
parallelism, tp = pp = 1), builds the same GPT and the distributed optimizer at every
zero stage, and prints per rank: bytes of parameters, of gradients (persistent between
steps; zero 2 also holds the full buffer during the last backward) and of optimizer
state (exp_avg + exp_avg_sq, + fp32 master weights when the model is not fp32), the
padding share, and the median step time (microbatches, reduction, clipping, AdamW,
all-gather) with the bucket reductions overlapped with backward and without.

ZeRO-3 also holds, during a step, the gathered units on top of its parameter shards
('param peak'); its "overlap" is the prefetch of the next unit's parameters and the
reduce-scatters kept in flight, and 'hidden' is the share of its communication hidden
behind compute: 1 - (time the step waited on collectives with overlap) / (the same
without overlap, where every collective is waited for as soon as it is issued), both from
the sharded parameters' recorded timeline.

Run it as ``trident bench zero ...``.
"""

from __future__ import annotations

import argparse
import statistics
import time

from trident.tools.local_ranks import run_on_local_ranks

MiB = 2**20


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "zero", help="ZeRO 0/1/2/3: per-rank bytes at dp 1/2/4, step time with/without overlap",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4], help="data-parallel sizes (local processes)")
    parser.add_argument("--zero", type=int, nargs="+", default=[0, 1, 2, 3], help="zero stages")
    parser.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks")
    parser.add_argument("--hidden", type=int, default=256, help="model width")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size")
    parser.add_argument("--seq", type=int, default=128, help="sequence length")
    parser.add_argument("--micro-batch", type=int, default=2, help="sequences per microbatch")
    parser.add_argument("--microbatches", type=int, default=2, help="microbatches per step per rank")
    parser.add_argument("--bucket-mb", type=float, default=4.0, help="gradient bucket size in MB")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the arguments, run every dp size in its own set of processes, print a table."""
    from trident.errors import UserError
    from trident.parallel.zero.mixed_precision import parse_dtype

    parse_dtype(args.dtype)
    for name in ("layers", "hidden", "vocab", "seq", "micro_batch", "microbatches", "steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.bucket_mb <= 0:
        raise UserError(f"--warmup must be >= 0 and --bucket-mb > 0, got {args.warmup} and {args.bucket_mb}")
    if any(d < 1 for d in args.dp) or any(z not in (0, 1, 2, 3) for z in args.zero):
        raise UserError(f"--dp sizes must be >= 1 and --zero stages in 0, 1, 2, 3; got {args.dp} and {args.zero}")
    config = {k: v for k, v in vars(args).items() if k != "func"}
    rows = []
    for dp in args.dp:
        rows += run_on_local_ranks(_measure, dp, config)
    print(format_report(rows, config))
    return 0


def _measure(dp: int, config: dict) -> list[dict]:
    import torch
    import torch.distributed as dist

    from trident.model.config import ModelConfig
    from trident.model.gpt import GPT
    from trident.parallel.topology import Topology
    from trident.parallel.zero.mixed_precision import MixedPrecisionConfig, parse_dtype
    from trident.parallel.zero.optimizer import DistributedOptimizer, OptimizerConfig

    topo = Topology.from_initialized(tp=1)
    cfg = ModelConfig(
        vocab_size=config["vocab"], n_layers=config["layers"], hidden=config["hidden"], n_heads=max(1, config["hidden"] // 64),
        max_seq_len=config["seq"],
    ).validate()
    gen = torch.Generator().manual_seed(1234 + topo.dp_rank)
    mb, seq = config["micro_batch"], config["seq"]
    tokens = torch.randint(0, cfg.vocab_size, (config["microbatches"], mb, seq + 1), generator=gen)
    divisor = float(config["microbatches"] * mb * seq * dp)
    rows = []
    for zero in config["zero"]:
        row: dict = {"dp": dp, "zero": zero}
        for overlap in (True, False):
            model = GPT(cfg, topo, dtype=parse_dtype(config["dtype"]))
            model.init_weights(0)
            ocfg = OptimizerConfig(zero=zero, bucket_mb=config["bucket_mb"], overlap_grad_reduce=overlap)
            opt = DistributedOptimizer(model, topo, ocfg, MixedPrecisionConfig(dtype=config["dtype"]), on_nonfinite="skip")
            times, waits = [], []
            for step in range(config["warmup"] + config["steps"]):
                dist.barrier()
                start = time.perf_counter()
                opt.zero_grad()
                for i in range(config["microbatches"]):
                    opt.before_backward(i, is_last=i == config["microbatches"] - 1)
                    x = tokens[i]
                    loss = model(x[:, :-1], labels=x[:, 1:]).float().sum() / divisor
                    opt.scale_loss(loss).backward()
                opt.grad_sync()
                opt.step()
                times.append(time.perf_counter() - start)
                waits.append(opt.buffer.exposed_wait_s() if zero == 3 else 0.0)
            key = "overlap" if overlap else "no_overlap"
            row[f"{key}_ms"] = 1000 * statistics.median(times[config["warmup"]:])
            row[f"{key}_wait_ms"] = 1000 * statistics.median(waits[config["warmup"]:])
            row["memory"] = opt.memory()
            opt.buffer.remove_hooks()
            del model, opt
        rows.append(row)
    return rows


def format_report(rows: list[dict], config: dict) -> str:
    m0 = rows[0]["memory"]
    lines = [
        f"trident bench zero: GPT {config['layers']} layers x {config['hidden']} wide, vocab {config['vocab']}, "
        f"{m0['numel'] / 1e6:.2f} M parameters, {config['dtype']}; per rank {config['microbatches']} microbatches "
        f"x {config['micro_batch']} x {config['seq']} tokens; buckets {config['bucket_mb']} MB (gloo, CPU)",
        "",
        f"{'dp':>3} {'zero':>4} {'params MiB':>10} {'param peak':>10} {'grads MiB':>10} {'peak grads':>10} "
        f"{'optim MiB':>10} {'padding KiB':>11} {'step ms overlap':>16} {'step ms no overlap':>19} {'hidden':>7}",
    ]
    for r in rows:
        m = r["memory"]
        hidden = "-"
        if r["zero"] == 3 and r["dp"] > 1 and r["no_overlap_wait_ms"] > 0:
            hidden = f"{100 * max(0.0, 1 - r['overlap_wait_ms'] / r['no_overlap_wait_ms']):.0f}%"
        lines.append(
            f"{r['dp']:>3} {r['zero']:>4} {m['param_bytes'] / MiB:>10.2f} "
            f"{m.get('param_peak_bytes', m['param_bytes']) / MiB:>10.2f} {m['grad_bytes'] / MiB:>10.2f} "
            f"{m['grad_peak_bytes'] / MiB:>10.2f} {m['optimizer_bytes'] / MiB:>10.2f} "
            f"{m['optimizer_padding_bytes'] / 1024:>11.2f} {r['overlap_ms']:>16.1f} {r['no_overlap_ms']:>19.1f} {hidden:>7}"
        )
    lines += [
        "",
        "optim = exp_avg + exp_avg_sq (+ fp32 master weights when the model is not fp32); grads = what persists "
        "between steps (zero 2 keeps only its shard; 'peak grads' is held during the last backward); padding = "
        "this rank's share of the bucket padding in the optimizer state; zero 3: 'param peak' adds the gathered "
        "units, 'hidden' = 1 - (collective wait with overlap) / (without), from the recorded timeline.",
    ]
    return "\n".join(lines)

