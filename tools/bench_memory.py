"""`trident bench memory`: one layer's saved activations by kind, planned vs measured, and
the sequence-parallel re-gather on a timeline.

For each tp size (local gloo processes) with and without sequence parallelism it builds a
small llama-style GPT, runs one training forward of a microbatch under saved-tensor
hooks, and attributes every storage autograd keeps to the module of the layer that
saved it first:

    norms            the two norms' inputs and statistics
    linear inputs    the qkv's and the MLP's first linear's input (the sequence shard under sp)
    attention        qkv (selective) or the attention core's tensors, and the projection's input
    mlp              the first MLP linear's output (gate and up for SwiGLU)
    dropout          residual-branch dropout masks

Storages two layers share (RoPE tables) are left out, as they are of a layer in the planner.
Each kind is printed next to `trident.planning.plan_memory.layer_bytes` (planner) and,
in units of s·b·h/tp, next to Megatron-LM's total per layer ``18 + 4·f/h``
(`trident.planning.megatron`; it assumes bf16, sequence parallelism and selective
recomputation).

``--trace DIR`` also profiles one forward+backward at tp 2 with sequence
parallelism (torch.profiler, Chrome trace ``DIR/regather_tp{tp}.json``) and prints, from
the trace, the re-gathers' exposed time (``sp_regather_wait`` spans: the backward waiting
for the all-gather it issued before the input-gradient matmul) against the input-gradient
matmuls that hide it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trident.tools.local_ranks import run_on_local_ranks

KINDS = ("norms", "linear inputs", "attention", "mlp", "dropout")
# module path inside a block -> kind of what it saves
MODULE_KIND = {"norm1": "norms", "norm2": "norms", "attn.qkv": "linear inputs", "mlp.fc": "linear inputs",
               "attn": "attention", "attn.q_norm": "attention", "attn.k_norm": "attention", "attn.proj": "attention",
               "mlp.proj": "mlp", "": "dropout", "dropout": "dropout"}
# planner part -> kind
PLAN_KIND = {"norms": "norms", "linear_inputs": "linear inputs", "qkv": "attention", "attention_core": "attention",
             "attention_output": "attention", "mlp": "mlp", "dropout_masks": "dropout", "block_input": "norms"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "memory", help="per-layer saved activations by kind: planner vs measured vs Megatron's formula",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4], help="tensor-parallel sizes (local processes)")
    parser.add_argument("--dtype", default="bf16", help="fp32 | bf16 | fp16")
    parser.add_argument("--recompute", default="selective", help="none | selective | full")
    parser.add_argument("--hidden", type=int, default=256, help="model width")
    parser.add_argument("--heads", type=int, default=8, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=4, help="key/value heads")
    parser.add_argument("--ffn", type=int, default=704, help="MLP width (SwiGLU)")
    parser.add_argument("--seq", type=int, default=256, help="sequence length")
    parser.add_argument("--micro-batch", type=int, default=2, help="sequences per microbatch")
    parser.add_argument("--trace", default=None, help="directory for the tp re-gather Chrome trace")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trident.errors import UserError
    from trident.model.gpt import RECOMPUTE
    from trident.parallel.zero.mixed_precision import parse_dtype

    parse_dtype(args.dtype)
    if args.recompute not in RECOMPUTE:
        raise UserError(f"--recompute is {args.recompute!r}; valid values are {', '.join(RECOMPUTE)}")
    for tp in args.tp:
        if tp < 1 or args.heads % tp or args.ffn % tp or args.seq % tp:
            raise UserError(f"--tp {tp} must be >= 1 and divide --heads {args.heads}, --ffn {args.ffn} and --seq {args.seq}")
    if args.trace:
        Path(args.trace).mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "func"}
    rows = []
    for tp in args.tp:
        rows += run_on_local_ranks(_rows, tp, config)
    print(format_report(rows, config))
    return 0


def _rows(tp: int, config: dict) -> list[dict]:
    """Every row of one tp size (this rank's view), and the trace at tp 2."""
    rows = [_measure(tp, sp, config) for sp in ((False, True) if tp > 1 else (False,))]
    if config["trace"] and tp == 2:
        rows[-1]["trace"] = _trace(tp, config)
    return rows


def _model(tp: int, sp: bool, config: dict):
    import torch

    from trident.model.config import ModelConfig
    from trident.model.gpt import GPT
    from trident.parallel.random import RNGStreams
    from trident.parallel.topology import Topology
    from trident.parallel.zero.mixed_precision import parse_dtype

    topo = Topology.single() if tp == 1 else Topology.from_initialized(tp=tp)
    cfg = ModelConfig(vocab_size=1024, n_layers=2, hidden=config["hidden"], n_heads=config["heads"],
                      n_kv_heads=config["kv_heads"], ffn_hidden=config["ffn"], max_seq_len=config["seq"]).validate()
    model = GPT(cfg, topo, sequence_parallel=sp, rng=RNGStreams(0, topo), dtype=parse_dtype(config["dtype"]),
                recompute=config["recompute"])
    model.init_weights(0)
    model.train()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (config["micro_batch"], config["seq"] + 1), generator=gen)
    return cfg, model, tokens


def _measure(tp: int, sp: bool, config: dict) -> dict:
    """Saved bytes of layer 0 by kind (measured) and the planner's parts for the same shapes."""
    import torch

    from trident.planning.plan_memory import Shapes, layer_bytes

    cfg, model, tokens = _model(tp, sp, config)
    params = {p.untyped_storage().data_ptr() for p in list(model.parameters()) + list(model.buffers())}
    where: list[tuple[int, str]] = []  # (layer, module path) of the modules running now
    first: dict[int, tuple[int, str, int]] = {}  # storage -> (layer, kind, bytes) of its first save
    layers_of: dict[int, set[int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key and key not in params and where:
            layer, path = where[-1]
            first.setdefault(key, (layer, MODULE_KIND.get(path, path), t.untyped_storage().nbytes()))
            layers_of.setdefault(key, set()).add(layer)
        return t

    def enter(place: tuple[int, str]):
        return lambda module, args: where.append(place)  # returns None: the input is unchanged

    def leave(module, args, output) -> None:
        where.pop()

    handles = []
    for i, block in model.layers.items():
        for path, module in block.named_modules():
            if path in MODULE_KIND:
                handles.append(module.register_forward_pre_hook(enter((int(i), path))))
                handles.append(module.register_forward_hook(leave))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens[:, :-1], labels=tokens[:, 1:]).float().mean()
    for h in handles:
        h.remove()
    layer0 = next(iter(model.layers))
    measured = dict.fromkeys(KINDS, 0)
    for key, (layer, kind, size) in first.items():
        if layer == int(layer0) and layers_of[key] == {layer}:
            measured[kind] += size
    loss.backward()
    x = Shapes(cfg, config["micro_batch"], config["seq"], tp, sp and tp > 1, config["dtype"], "cpu", False)
    planned = dict.fromkeys(KINDS, 0)
    for part, size in layer_bytes(x, config["recompute"]).items():
        planned[PLAN_KIND[part]] += size
    return {"tp": tp, "sp": sp, "measured": measured, "planned": planned,
            "unit": config["micro_batch"] * config["seq"] * cfg.hidden / tp,
            "megatron": 18 + 4 * cfg.ffn / cfg.hidden}


def _trace(tp: int, config: dict) -> dict:
    """Profile a forward+backward with sequence parallelism; sum the re-gather spans."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    cfg, model, tokens = _model(tp, True, config)
    for _ in range(2):  # warm up (first calls allocate and initialise gloo buffers)
        model(tokens[:, :-1], labels=tokens[:, 1:]).float().mean().backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(tokens[:, :-1], labels=tokens[:, 1:]).float().mean().backward()
    path = Path(config["trace"]) / f"regather_tp{tp}_rank{dist.get_rank()}.json"
    prof.export_chrome_trace(str(path))
    totals = {}
    for event in prof.events():
        if event.name.startswith("sp_"):
            totals[event.name] = totals.get(event.name, 0.0) + event.cpu_time_total / 1e3
    return {"path": str(path), "ms": totals}


def format_report(rows: list[dict], config: dict) -> str:
    lines = [
        f"trident bench memory: one layer's saved activations (KiB), GPT hidden {config['hidden']}, "
        f"{config['heads']} heads / {config['kv_heads']} kv, SwiGLU {config['ffn']}, seq {config['seq']}, "
        f"micro batch {config['micro_batch']}, {config['dtype']}, recompute {config['recompute']} (CPU, gloo)",
        "",
        f"{'tp':>3} {'sp':>3} " + " ".join(f"{k:>22}" for k in KINDS) + f" {'total':>22} {'units':>14} {'Megatron':>9}",
    ]
    for r in rows:
        cells = [f"{r['planned'][k] / 1024:>9.1f} / {r['measured'][k] / 1024:>9.1f} " for k in KINDS]
        planned, measured = sum(r["planned"].values()), sum(r["measured"].values())
        units = f"{planned / r['unit']:>6.2f} /{measured / r['unit']:>6.2f}"
        lines.append(f"{r['tp']:>3} {'yes' if r['sp'] else 'no':>3} " + " ".join(cells)
                     + f" {planned / 1024:>9.1f} / {measured / 1024:>9.1f}  {units} {r['megatron']:>9.2f}")
    lines += [
        "",
        "each cell: planner / measured. units: the layer's bytes / (s·b·h/tp); Megatron's formula per layer "
        "(18 + 4·f/h, bf16, sequence parallel, selective recomputation) for comparison.",
    ]
    for r in rows:
        if "trace" in r:
            ms = r["trace"]["ms"]
            lines += ["", f"re-gather at tp {r['tp']} with sequence parallelism (rank 0, one forward+backward; "
                          f"trace {r['trace']['path']}):"]
            lines += [f"  {name:<24} {ms[name]:8.2f} ms" for name in sorted(ms)]
            lines.append("  sp_gather_forward: the forward's blocking gathers (the same sizes); sp_regather_wait: the "
                         "backward re-gathers' exposed time (issued before sp_input_grad, which runs meanwhile; "
                         "includes waiting for the other rank).")
    return "\n".join(lines)
