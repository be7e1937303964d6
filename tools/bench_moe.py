"""`trident bench moe`: forward+backward time of one MoE layer, grouped matmul vs expert loop,
next to the dense MLP of equal active FLOPs, and the same layer under expert parallelism.

Side by side in one run, on the same input (T = batch x seq tokens of width ``--hidden``):

* MoE, grouped -- `trident.model.moe.MoE` (router, permute, one ``torch._grouped_mm`` per
  projection over the expert-sorted rows, un-permute, balancing losses), what a run uses
  where the build has ``torch._grouped_mm``;
* MoE, expert loop -- the same layer with the fallback: one pair of matmuls per expert over
  its contiguous rows (one host sync for the counts);
* dense MLP -- `trident.model.gpt.MLP`, SwiGLU of width k x ``--ffn``: the same matmul FLOPs
  per token as the MoE's k experts (the router's T x E x hidden is the MoE's extra).

The MoE rows hold E x the expert parameters the dense row holds k x of.

Expert parallelism (``parallel.ep``): ``--ranks`` local gloo processes
(`trident.tools.local_ranks`, dp = ranks, tp = pp = 1) each route their own T tokens
through the same layer built at every ep of ``--ep``, holding E/ep experts; rows reach
their experts' ranks by all-to-all and come back. Per ep and path: the step time (the
best round of each rank, the slowest rank), tokens/s over all ranks, and the bytes one
rank sends to the others per step (dispatch + combine, forward + backward), mean over
ranks: measured -- what the layer handed to its all-to-alls (``moe_step_end``'s
``moe_a2a_bytes``) -- next to the count from the routing (rows routed to another rank's
experts, 4 x hidden x bytes each) and the uniform-routing formula `would_send`. On one
machine the all-to-all is a memory copy through gloo and the ranks share the cores, so
these times show the dispatch's overhead, not a network's cost.

Timings are interleaved over ``--repeats`` rounds after ``--warmup`` untimed ones; the
best is printed.
"""

from __future__ import annotations

import argparse
import time

from trident.tools.local_ranks import run_on_local_ranks

KiB = 1024


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "moe", help="MoE layer step: grouped matmul vs expert loop vs dense MLP; ep 1/2/4 with all-to-all bytes",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--experts", type=int, default=8, help="routed experts E")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token k")
    parser.add_argument("--hidden", type=int, default=256, help="model width")
    parser.add_argument("--ffn", type=int, default=256, help="width of one expert (the dense MLP is k x this)")
    parser.add_argument("--batch", type=int, default=4, help="sequences (per rank in the ep section)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="parameter and activation dtype")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (the best is printed)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="torch device of the one-process rows")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the input")
    parser.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4], help="expert-parallel sizes")
    parser.add_argument("--ranks", type=int, default=4, help="local gloo processes of the ep section (dp)")
    parser.set_defaults(func=run)


def _moe(args: argparse.Namespace, topo, device, dtype):
    """The MoE layer at `topo`'s ep (its E/ep experts), initialised from --seed, and its config."""
    from trident.model.config import preset
    from trident.model.moe import MoE
    from trident.parallel.tensor.sharding import init_parameters

    heads = max(1, args.hidden // 64)
    cfg = preset("tiny", hidden=args.hidden, n_heads=heads, n_kv_heads=heads, ffn_hidden=args.top_k * args.ffn,
                 moe_experts=args.experts, moe_top_k=args.top_k, moe_ffn_hidden=args.ffn, moe_aux_loss_coef=0.01)
    moe = MoE(cfg, topo, 0, False, None, device, dtype)
    init_parameters(moe, args.seed)  # by global name: every ep rank's experts are its slice of ep = 1's
    moe.train()
    return moe, cfg


def _layers(args: argparse.Namespace, device, dtype):
    """(the MoE layer, the dense MLP of width k x ffn), initialised from --seed."""
    from trident.model.gpt import MLP
    from trident.parallel.tensor.sharding import init_parameters
    from trident.parallel.topology import Topology

    topo = Topology.single(device)
    moe, cfg = _moe(args, topo, device, dtype)
    dense = MLP(cfg, topo, False, device, dtype)
    init_parameters(dense, args.seed)
    dense.train()
    return moe, dense


def inputs(args: argparse.Namespace, rank: int, device, dtype):
    """(x [b, s, h], the output's gradient) of one rank: seeded by --seed + rank."""
    import torch

    gen = torch.Generator().manual_seed(args.seed + rank)
    x = torch.randn(args.batch, args.seq, args.hidden, generator=gen).to(device, dtype)  # [b, s, h]
    return x, torch.randn(x.shape, generator=gen).to(device, dtype)


def _step(layer, x, grad, reset: bool = True):
    def run() -> None:
        layer.zero_grad(set_to_none=True)
        layer(x).backward(grad)
        if reset and hasattr(layer, "reset_stats"):
            layer.reset_stats()  # the step's statistics (read by moe_step_end in a run)

    return run


def _time(fn, device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _forced(path: str, key: tuple, fn):
    """`fn` with the experts' path pinned (the probe's cache: what the layer consults)."""
    from trident.model import moe

    def run() -> None:
        saved = moe._GROUPED_OK.get(key)
        moe._GROUPED_OK[key] = path == "grouped"
        try:
            fn()
        finally:
            if saved is None:
                moe._GROUPED_OK.pop(key, None)
            else:
                moe._GROUPED_OK[key] = saved

    return run


def would_send(tokens: int, k: int, hidden: int, elem: int, ep: int) -> int:
    """Bytes one rank's all-to-alls send to other ranks per step at expert parallelism `ep`
    under uniform routing: (ep-1)/ep of the T x k routed rows live elsewhere; dispatch and
    combine in the forward, the same two for the gradients in the backward."""
    return 4 * tokens * k * hidden * elem * (ep - 1) // ep


def _check(args: argparse.Namespace) -> None:
    """One sentence per wrong argument, before anything is built or started."""
    from trident.errors import UserError

    if args.repeats < 1 or args.warmup < 0 or not 1 <= args.top_k <= args.experts or min(args.batch, args.seq) < 1:
        raise UserError(f"need --repeats >= 1, --warmup >= 0, 1 <= --top-k <= --experts, --batch and --seq >= 1; "
                        f"got {args.repeats}, {args.warmup}, {args.top_k}, {args.experts}, {args.batch}, {args.seq}")
    if args.ranks < 1:
        raise UserError(f"--ranks must be >= 1, got {args.ranks}")
    for ep in args.ep:
        if ep < 1 or args.ranks % ep or args.experts % ep:
            raise UserError(f"--ep {ep} must divide --ranks {args.ranks} and --experts {args.experts}")


def run(args: argparse.Namespace) -> int:
    """Time the three one-process rows, interleaved, and print them; then the ep section."""
    import torch

    from trident.model.moe import grouped_mm_supported

    _check(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    moe, dense = _layers(args, device, dtype)
    x, grad = inputs(args, 0, device, dtype)
    key = (device.type, dtype, args.hidden, args.ffn)
    cases = {}
    if grouped_mm_supported(device, dtype, args.hidden, args.ffn):
        cases["MoE, grouped matmul"] = _forced("grouped", key, _step(moe, x, grad))
    cases["MoE, expert loop"] = _forced("loop", key, _step(moe, x, grad))
    cases[f"dense MLP, width {args.top_k}x{args.ffn}"] = _step(dense, x, grad)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(args.warmup + args.repeats):
        for name, fn in cases.items():
            t = _time(fn, device)
            if i >= args.warmup:
                times[name].append(t)
    _report(args, moe, dense, times, grouped=len(cases) == 3, threads=torch.get_num_threads())
    config = {k: v for k, v in vars(args).items() if k != "func"}
    print(format_ep(run_on_local_ranks(measure_ep, args.ranks, config), config))
    return 0


def _report(args: argparse.Namespace, moe, dense, times: dict[str, list[float]], grouped: bool, threads: int) -> None:
    """The one-process rows (best of the rounds) and the parameter counts."""
    tokens = args.batch * args.seq
    n_moe, n_dense = (sum(p.numel() for p in m.parameters()) for m in (moe, dense))
    idle = (args.experts - args.top_k) * 3 * args.hidden * args.ffn  # the experts a token does not use
    print(f"trident bench moe: E={args.experts} k={args.top_k} hidden {args.hidden} expert ffn {args.ffn}, "
          f"{tokens} tokens ({args.batch} x {args.seq}), {args.dtype} {args.device}, {threads} threads, "
          f"forward+backward of one layer, best of {args.repeats}")
    print(f"  parameters: MoE {n_moe:,} (active per token {n_moe - idle:,}), dense {n_dense:,}")
    if not grouped:
        print("  MoE, grouped matmul: not available (torch._grouped_mm missing or unsupported for this dtype/shape)")
    base = min(times[f"dense MLP, width {args.top_k}x{args.ffn}"])
    print(f"    {'':<30}{'ms':>10}{'tokens/s':>12}{'x dense':>9}")
    for name, ts in times.items():
        t = min(ts)
        print(f"    {name:<30}{t * 1e3:>10.2f}{tokens / t:>12,.0f}{t / base:>9.2f}")


# --- expert parallelism (each local rank runs this) ----------------------------------------
def measure_ep(world: int, config: dict) -> list[dict]:
    """Every ep of the list on this rank, all (ep, path) cases interleaved round by round; rank
    0 returns per ep the slowest rank's best times and the mean bytes sent per rank."""
    import torch
    import torch.distributed as dist

    from trident.model.moe import grouped_mm_supported
    from trident.parallel.topology import Topology

    args, cpu = argparse.Namespace(**config), torch.device("cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    x, grad = inputs(args, dist.get_rank(), cpu, dtype)
    built = {}
    for ep in args.ep:  # collective: every rank builds every ep's groups in the same order
        topo = Topology.from_initialized(tp=1, ep=ep)
        built[ep] = (topo, *_moe(args, topo, cpu, dtype))
    paths = (["grouped"] if grouped_mm_supported(cpu, dtype, args.hidden, args.ffn) else []) + ["loop"]
    key = (cpu.type, dtype, args.hidden, args.ffn)
    best = {(ep, p): float("inf") for ep in args.ep for p in paths}
    sent = {ep: (0.0, 0.0) for ep in args.ep}
    for i in range(args.warmup + args.repeats):
        for ep, path in best:
            topo, moe, cfg = built[ep]
            dist.barrier()
            t = _time(_forced(path, key, _step(moe, x, grad, reset=False)), cpu)
            if i >= args.warmup:
                best[ep, path] = min(best[ep, path], t)
            sent[ep] = _bytes_sent(moe, cfg, topo)
    slowest = torch.tensor(list(best.values()), dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    routed = torch.tensor([sent[ep][1] for ep in args.ep], dtype=torch.float64)
    dist.all_reduce(routed)
    times = dict(zip(best, slowest.tolist()))
    return [{"ep": ep, "grouped_s": times.get((ep, "grouped")), "loop_s": times[ep, "loop"],
             "measured_bytes": sent[ep][0], "routing_bytes": routed[j].item() / world} for j, ep in enumerate(args.ep)]


def _bytes_sent(moe, cfg, topo) -> tuple[float, float]:
    """(bytes the layer handed to its all-to-alls this step, mean per rank, forward + backward:
    `moe_step_end`'s moe_a2a_bytes, collective; this rank's count from its routing: rows
    routed to another rank's experts x 4 x hidden x element size). Resets the layer's stats."""
    from trident.model.moe import moe_step_end

    counts = moe.stats["counts"]  # [E] this rank's assignments per expert
    mine = counts.view(topo.ep, -1)[topo.ep_rank].sum()  # [E/ep] on this rank
    routed = 4.0 * float(counts.sum() - mine) * cfg.hidden * moe.experts.gate_up.element_size()
    measured = moe_step_end(moe, cfg, topo, update_bias=False).get("moe_a2a_bytes", 0.0)  # absent at ep = 1
    return measured, routed


def format_ep(rows: list[dict], config: dict) -> str:
    """One row per ep: both paths' step times and tokens/s, the bytes measured, counted and by formula."""
    ranks, tokens = config["ranks"], config["batch"] * config["seq"]
    elem = 2 if config["dtype"] == "bf16" else 4
    lines = [
        f"  expert parallel: {ranks} gloo ranks (dp {ranks}, one thread each) x {tokens} tokens each, E/ep experts "
        f"per rank, forward+backward of one layer, best of {config['repeats']} (slowest rank);",
        "  all-to-all: KiB one rank sends to the others per step, mean over ranks (dispatch + combine, forward + "
        "backward)",
        f"    {'ep':>3}{'experts/rank':>14}{'grouped ms':>12}{'tokens/s':>10}{'loop ms':>10}{'tokens/s':>10}"
        f"{'a2a measured':>14}{'from routing':>14}{'uniform':>10}",
    ]
    for r in rows:
        cols = []
        for s in (r["grouped_s"], r["loop_s"]):
            cols += [f"{s * 1e3:.1f}", f"{ranks * tokens / s:,.0f}"] if s is not None else ["-", "-"]
        formula = would_send(tokens, config["top_k"], config["hidden"], elem, r["ep"])
        lines.append(f"    {r['ep']:>3}{config['experts'] // r['ep']:>14}{cols[0]:>12}{cols[1]:>10}{cols[2]:>10}"
                     f"{cols[3]:>10}{r['measured_bytes'] / KiB:>14,.2f}{r['routing_bytes'] / KiB:>14,.2f}"
                     f"{formula / KiB:>10,.2f}")
    lines += [
        f"  measured = what the layer gave all_to_all_single (moe_a2a_bytes); from routing = rows routed to "
        f"another rank's experts x 4 x hidden x {elem} B; uniform = 4 x T x k x hidden x {elem} B x (ep-1)/ep,",
        "  the expectation under uniform routing. On one CPU machine the all-to-all is a local memory copy through "
        "gloo and the ranks share the cores,",
        "  so these step times show the dispatch's overhead, not a network's cost; compare them with each other, "
        "not with the one-process rows above.",
    ]
    return "\n".join(lines)
