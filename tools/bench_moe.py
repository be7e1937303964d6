"""`trident bench moe`: forward+backward time of one MoE layer, grouped matmul vs expert loop,
next to the dense MLP of equal active FLOPs.

Side by side in one run, on the same input (T = batch x seq tokens of width ``--hidden``):

* MoE, grouped -- `trident.model.moe.MoE` (router, permute, one ``torch._grouped_mm`` per
  projection over the expert-sorted rows, un-permute, balancing losses), what a run uses
  where the build has ``torch._grouped_mm``;
* MoE, expert loop -- the same layer with the fallback: one pair of matmuls per expert over
  its contiguous rows (one host sync for the counts);
* dense MLP -- `trident.model.gpt.MLP`, SwiGLU of width k x ``--ffn``: the same matmul FLOPs
  per token as the MoE's k experts (the router's T x E x hidden is the MoE's extra).

The MoE rows hold E x the expert parameters the dense row holds k x of. Timings are
interleaved over ``--repeats`` rounds after ``--warmup`` untimed ones; the best is printed.
Expert parallelism (``parallel.ep``) is not built yet, so no all-to-all is measured; the
bytes it would send are printed from the formula, labelled as such.
"""

from __future__ import annotations

import argparse
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "moe", help="MoE layer step: grouped matmul vs expert loop vs dense MLP of equal active FLOPs",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--experts", type=int, default=8, help="routed experts E")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token k")
    parser.add_argument("--hidden", type=int, default=256, help="model width")
    parser.add_argument("--ffn", type=int, default=256, help="width of one expert (the dense MLP is k x this)")
    parser.add_argument("--batch", type=int, default=4, help="sequences")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="parameter and activation dtype")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (the best is printed)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the input")
    parser.set_defaults(func=run)


def _layers(args: argparse.Namespace, device, dtype):
    """(the MoE layer, the dense MLP of width k x ffn), initialised from --seed."""
    from trident.model.config import preset
    from trident.model.gpt import MLP
    from trident.model.moe import MoE
    from trident.parallel.tensor.sharding import init_parameters
    from trident.parallel.topology import Topology

    heads = max(1, args.hidden // 64)
    cfg = preset("tiny", hidden=args.hidden, n_heads=heads, n_kv_heads=heads, ffn_hidden=args.top_k * args.ffn,
                 moe_experts=args.experts, moe_top_k=args.top_k, moe_ffn_hidden=args.ffn, moe_aux_loss_coef=0.01)
    topo = Topology.single(device)
    moe = MoE(cfg, topo, 0, False, None, device, dtype)
    dense = MLP(cfg, topo, False, device, dtype)
    for module in (moe, dense):
        init_parameters(module, args.seed)
        module.train()
    return moe, dense


def _step(layer, x, grad):
    def run() -> None:
        layer.zero_grad(set_to_none=True)
        layer(x).backward(grad)
        if hasattr(layer, "reset_stats"):
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
    """Bytes one rank's all-to-alls would move per step at expert parallelism `ep` under uniform
    routing: (ep-1)/ep of the T x k routed rows live elsewhere; dispatch and combine in the
    forward, the same two for the gradients in the backward."""
    return 4 * tokens * k * hidden * elem * (ep - 1) // ep


def run(args: argparse.Namespace) -> int:
    """Time the three rows, interleaved, and print them side by side."""
    import torch

    from trident.errors import UserError
    from trident.model.moe import grouped_mm_supported

    if args.repeats < 1 or args.warmup < 0 or not 1 <= args.top_k <= args.experts or min(args.batch, args.seq) < 1:
        raise UserError(f"need --repeats >= 1, --warmup >= 0, 1 <= --top-k <= --experts, --batch and --seq >= 1; "
                        f"got {args.repeats}, {args.warmup}, {args.top_k}, {args.experts}, {args.batch}, {args.seq}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    moe, dense = _layers(args, device, dtype)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, args.seq, args.hidden, generator=gen).to(device, dtype)  # [b, s, h]
    grad = torch.randn(x.shape, generator=gen).to(device, dtype)
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
    _report(args, moe, dense, times, grouped=len(cases) == 3, threads=torch.get_num_threads(), dtype=dtype)
    return 0


def _report(args: argparse.Namespace, moe, dense, times: dict[str, list[float]], grouped: bool, threads: int,
            dtype) -> None:
    """The rows (best of the rounds), the parameter counts and the all-to-all line."""
    import torch

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
    elem = torch.finfo(dtype).bits // 8
    sends = ", ".join(f"ep={ep}: {would_send(tokens, args.top_k, args.hidden, elem, ep) / 2**20:.2f} MiB"
                      for ep in (2, 4))
    print(f"  all-to-all: not measured, expert parallelism (parallel.ep) is not built yet; per rank per step it "
          f"would send {sends} (4 x T x k x hidden x {elem} B x (ep-1)/ep: uniform routing, dispatch + combine, "
          f"forward + backward, for these {tokens} tokens per rank)")
