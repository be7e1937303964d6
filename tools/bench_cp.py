"""`trident bench cp`: context parallelism measured: activations per rank, step time, and
how much of the ring's transfer time hides behind attention.

For each cp size it starts cp local gloo processes (`trident.tools.local_ranks`; tp = pp =
dp = 1, so every rank is a cp rank) and trains a tiny llama-style GPT (RoPE, GQA, SwiGLU,
RMSNorm) on batch-1 sequences of ``--seq-len`` tokens through the real executor and
distributed optimizer: each rank holds seq_len/cp tokens, attention runs as ring attention.
One row per cp:

* activ.: the per-rank activation peak of one step, measured by the saved-tensor meter
  (`trident.training.memory.ActivationMeter`), largest rank; next to it the planner's
  figure for the same layout (`trident plan`, built from the config alone).
* ring buf: the ring's K/V and fp32 dK/dV blocks in flight (2 K/V + 3 dK/dV blocks of
  [b, kv_heads, s/cp, head_dim]). Autograd does not save them, so the meter cannot see
  them; the figure is the planner's (`plan_pipeline.ring_buffer_bytes`).
* step ms: median wall time of a training step (forward, backward, gradient reduction over
  cp, AdamW), timed without the meter.
* ring MB: bytes one rank sends into the ring per step, counted by the ring itself
  (`ring_attention.RING_STATS`), next to the planner's count.
* hidden: the share of the ring's transfer time hidden behind attention: 1 - wait / alone,
  with wait the time the ring spent waiting for its transfers after the block in hand was
  computed (`RING_STATS["wait_s"]`, per step) and alone the time the same transfers take
  when replayed one after another with nothing to hide behind.
* check: whether activ. + ring buf at cp = N is within 10% of cp = 1's activ. / N + ring
  buf (the sequence-proportional tensors shrink by N; the ring adds its blocks).

Times on a CPU box with gloo and several ranks per core are figures to compare, not
predictions of a GPU cluster. There the wait is mostly the backward's last dK/dV hop,
which has nothing to hide behind and absorbs the skew between ranks sharing cores (a
neighbour that has not yet posted its send); the hops posted before a block's compute
wait next to nothing, so a low hidden share on 2 cores says more about the box than
about the overlap. Run it as ``trident bench cp --seq-len 4096 --cp 1 2 4``.
"""

from __future__ import annotations

import argparse
import statistics
import time

from trident.tools.local_ranks import run_on_local_ranks

MiB = 2**20
TOLERANCE = 0.10  # the check's bound on activ. + ring buf against cp = 1's / N + ring buf


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cp", help="context parallelism: activation per rank, step time and ring overlap at cp 1/2/4",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (a multiple of 2*cp)")
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4], help="context-parallel sizes (local processes)")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--hidden", type=int, default=128, help="model width")
    parser.add_argument("--heads", type=int, default=4, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads (grouped-query)")
    parser.add_argument("--ffn", type=int, default=256, help="SwiGLU hidden width")
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary size")
    parser.add_argument("--dtype", default="fp32", help="fp32 | bf16")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (the first is metered)")
    parser.set_defaults(func=run)


def make_config(args: argparse.Namespace) -> dict:
    """Check the arguments before any process starts (one sentence each); what every rank reads."""
    from trident.errors import UserError
    from trident.parallel.context.sharding import check_cp

    for name in ("seq_len", "layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 1:
        raise UserError(f"--warmup must be >= 1 (the first step is the metered one), got {args.warmup}")
    if args.dtype not in ("fp32", "bf16"):
        raise UserError(f"--dtype is {args.dtype!r}; valid values are fp32, bf16")
    if args.heads % args.kv_heads or args.hidden % args.heads:
        raise UserError(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads} and divide "
                        f"--hidden {args.hidden}")
    for cp in args.cp:
        check_cp(args.seq_len, cp)
    return {k: v for k, v in vars(args).items() if k != "func"}


def run(args: argparse.Namespace) -> int:
    """Every cp size in its own set of processes, then the table."""
    config = make_config(args)
    rows = [run_on_local_ranks(measure, cp, config) for cp in config["cp"]]
    print(format_report(rows, config))
    return 0


def _setup(world: int, config: dict):
    """This rank's topology, model, optimizer, microbatch and the planner's settings."""
    import torch

    from trident.model.config import ModelConfig
    from trident.model.stage import build_stage
    from trident.parallel.random import RNGStreams
    from trident.parallel.topology import Topology
    from trident.parallel.zero.mixed_precision import MixedPrecisionConfig, parse_dtype
    from trident.parallel.zero.optimizer import DistributedOptimizer, OptimizerConfig
    from trident.planning.plan import Settings

    topo = Topology.from_initialized(tp=1, cp=world)
    seq = config["seq_len"]
    cfg = ModelConfig(vocab_size=config["vocab"], n_layers=config["layers"], hidden=config["hidden"],
                      n_heads=config["heads"], n_kv_heads=config["kv_heads"], ffn_hidden=config["ffn"],
                      max_seq_len=seq).validate()
    model = build_stage(cfg, topo, rng=RNGStreams(0, topo), dtype=parse_dtype(config["dtype"]))
    model.init_weights(0)
    model.train()
    opt = DistributedOptimizer(model, topo, OptimizerConfig(zero=1), MixedPrecisionConfig(dtype=config["dtype"]))
    tokens = torch.randint(0, cfg.vocab_size, (1, seq + 1), generator=torch.Generator().manual_seed(0))
    micro = {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}  # whole; the executor cuts
    st = Settings(tp=1, pp=1, dp=1, cp=world, zero=1, recompute="none", micro_batch_size=1, seq_len=seq,
                  global_batch_size=1, sequence_parallel=False, dtype=config["dtype"], doc_masking=False)
    return topo, cfg, model, opt, micro, st


def measure(world: int, config: dict) -> dict:
    """One cp size on this rank: a metered step, timed steps, the ring's waits and a replay
    of its transfers; rank 0 returns the figures (the largest over ranks, or their mean)."""
    import torch
    import torch.distributed as dist

    from trident.parallel.context.ring_attention import RING_STATS
    from trident.parallel.pipeline.executor import run_pipeline
    from trident.parallel.pipeline.p2p import activation_shape
    from trident.planning.planner import make_plan
    from trident.training.memory import ActivationMeter

    topo, cfg, model, opt, micro, st = _setup(world, config)
    shape = activation_shape(1, st.seq_len, cfg.hidden, 1, False, world)

    def step() -> None:
        opt.zero_grad()
        run_pipeline(model, topo, [micro], act_shape=shape, loss_divisor=float(st.seq_len),
                     grad_sync=opt.grad_sync, before_backward=opt.before_backward)
        opt.step()

    with ActivationMeter(model) as meter:
        step()
    peak = torch.tensor([float(meter.peak_bytes)])
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    for _ in range(config["warmup"] - 1):
        step()
    times = []
    RING_STATS.clear()
    for _ in range(config["steps"]):
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    waits = torch.tensor([RING_STATS["wait_s"] / config["steps"], RING_STATS["sent_bytes"] / config["steps"]])
    alone = replay_ring(topo, cfg, st, config["layers"]) if world > 1 else 0.0
    figures = torch.tensor([statistics.median(times), alone, *waits.tolist()])
    dist.all_reduce(figures)
    figures /= world  # the mean over ranks (load-balanced: every rank does the same work)
    plan = make_plan(cfg, st, "cpu")
    return {"cp": world, "activation_bytes": int(peak.item()), "planned_activation_bytes": plan.stages[0].activation_bytes,
            "ring_buffer_bytes": plan.stages[0].activations.ring_buffer, "step_s": figures[0].item(),
            "ring_alone_s": figures[1].item(), "ring_wait_s": figures[2].item(), "ring_sent_bytes": figures[3].item(),
            "planned_ring_bytes": plan.comm_bytes.get("cp", 0.0)}


def replay_ring(topo, cfg, st, layers: int, repeats: int = 3) -> float:
    """Seconds one step's ring transfers take alone: the same hops as ring attention posts
    (per layer, cp - 1 K/V blocks forward; cp - 1 K/V blocks and cp fp32 dK/dV blocks
    backward), each sent to the next cp rank and received from the previous one and waited
    on at once, with no compute to hide behind. The best of `repeats`."""
    import torch
    import torch.distributed as dist

    from trident.parallel.zero.mixed_precision import parse_dtype

    cp, rank = topo.cp, topo.cp_rank
    nxt = dist.get_global_rank(topo.cp_group, (rank + 1) % cp)
    prev = dist.get_global_rank(topo.cp_group, (rank - 1) % cp)
    block = (2, st.micro_batch_size, cfg.kv_heads, st.local_seq, cfg.head_dim)  # [k|v, b, kv, s/cp, head_dim]
    kv = [torch.zeros(block, dtype=parse_dtype(st.dtype)) for _ in range(2)]
    dkv = [torch.zeros(block, dtype=torch.float32) for _ in range(2)]
    hops = layers * ([kv] * (2 * (cp - 1)) + [dkv] * cp)
    best = float("inf")
    for _ in range(repeats):
        dist.barrier(group=topo.cp_group)
        start = time.perf_counter()
        for send, recv in hops:
            ops = [dist.P2POp(dist.isend, send, nxt, topo.cp_group), dist.P2POp(dist.irecv, recv, prev, topo.cp_group)]
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        best = min(best, time.perf_counter() - start)
    return best


def check_row(row: dict, base: dict | None) -> tuple[float | None, str]:
    """(activ. + ring buf) / (cp = 1's activ. / N + ring buf) - 1, and the check's word."""
    if base is None or row["cp"] == 1:
        return None, "-" if base is None or row["cp"] > 1 else "(base)"
    expected = base["activation_bytes"] / row["cp"] + row["ring_buffer_bytes"]
    err = (row["activation_bytes"] + row["ring_buffer_bytes"]) / expected - 1
    return err, "ok" if abs(err) <= TOLERANCE else "NO"


def format_report(rows: list[dict], config: dict) -> str:
    """One row per cp size, with the check against cp = 1 when it was run."""
    base = next((r for r in rows if r["cp"] == 1), None)
    lines = [
        f"trident bench cp: llama-style GPT, {config['layers']} layers x {config['hidden']} wide, {config['heads']} "
        f"heads ({config['kv_heads']} kv), SwiGLU {config['ffn']}, vocab {config['vocab']}, {config['dtype']}; "
        f"batch 1 x {config['seq_len']} tokens; {config['steps']} timed steps (gloo, CPU, one thread per rank)",
        "",
        f"{'cp':>3} {'tokens/rank':>11} {'activ. MiB':>10} {'planned':>8} {'ring buf MiB':>12} {'step ms':>9} "
        f"{'ring MB':>8} {'planned':>8} {'wait ms':>8} {'alone ms':>8} {'hidden':>7}  check (vs cp=1/N + ring buf)",
    ]
    for r in rows:
        err, word = check_row(r, base)
        ring = r["cp"] > 1
        hidden = max(0.0, 1 - r["ring_wait_s"] / r["ring_alone_s"]) if ring and r["ring_alone_s"] > 0 else None
        lines.append(
            f"{r['cp']:>3} {config['seq_len'] // r['cp']:>11} {r['activation_bytes'] / MiB:>10.2f} "
            f"{r['planned_activation_bytes'] / MiB:>8.2f} {r['ring_buffer_bytes'] / MiB:>12.3f} "
            f"{1000 * r['step_s']:>9.1f} "
            + (f"{r['ring_sent_bytes'] / 1e6:>8.2f} {r['planned_ring_bytes'] / 1e6:>8.2f} {1000 * r['ring_wait_s']:>8.1f} "
               f"{1000 * r['ring_alone_s']:>8.1f} {100 * hidden:>6.0f}%" if ring else
               f"{'-':>8} {'-':>8} {'-':>8} {'-':>8} {'-':>7}")
            + f"  {word}" + (f" ({err:+.1%})" if err is not None else "")
        )
    lines += [
        "",
        "activ. = saved-tensor peak per rank (meter; planned = trident plan); ring buf = the ring's K/V + fp32 dK/dV "
        "blocks in flight (planner's count: autograd does not save them, the meter cannot see them); ring MB = bytes "
        "a rank sends into the ring per step (counted / planned); hidden = 1 - wait / alone, the share of the ring's "
        f"transfer time spent behind attention compute; check: within {TOLERANCE:.0%}.",
    ]
    return "\n".join(lines)
