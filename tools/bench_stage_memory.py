"""`trident bench stage-memory`: what each pipeline schedule holds per rank, and what freeing
sent stage outputs saves.

On `--pp` local gloo ranks it trains one step of a small llama-style GPT under every
schedule (interleaved with `--vpp` chunks per rank), twice: keeping each stage's output
until its backward (as before Megatron's ``deallocate_output_tensor``) and releasing it
once sent. Per rank it prints the peak bytes of stage inputs and outputs the executor
holds (`PipelineResult.held_bytes_peak`) both ways, and the peak of autograd's saved
activations (`trident.training.memory.ActivationMeter`, saved-tensor hooks), which the
release does not change.
"""

from __future__ import annotations

import argparse

from trident.tools.local_ranks import run_on_local_ranks

SCHEDULES = ("1f1b", "interleaved", "zb-h1", "gpipe")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "stage-memory", help="per-schedule pipeline memory per rank: stage outputs freed vs kept",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pp", type=int, default=2, help="pipeline ranks (local processes)")
    parser.add_argument("--vpp", type=int, default=2, help="chunks per rank for the interleaved schedule")
    parser.add_argument("--microbatches", "-m", type=int, default=8, help="microbatches per step")
    parser.add_argument("--layers", type=int, default=8, help="transformer layers")
    parser.add_argument("--hidden", type=int, default=256, help="model width")
    parser.add_argument("--seq", type=int, default=256, help="sequence length")
    parser.add_argument("--micro-batch", type=int, default=2, help="sequences per microbatch")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trident.errors import UserError
    from trident.parallel.pipeline.schedule import check_layout

    if args.pp < 2:
        raise UserError(f"--pp must be >= 2 for a pipeline, got {args.pp}")
    if args.pp * args.vpp > args.layers:
        raise UserError(f"--pp {args.pp} x --vpp {args.vpp} chunks need at least that many --layers, got {args.layers}")
    check_layout("interleaved", args.pp, args.microbatches, args.vpp)
    config = {k: v for k, v in vars(args).items() if k != "func"}
    print(format_report(run_on_local_ranks(_measure_all, args.pp, config), config))
    return 0


def _measure_all(world: int, config: dict) -> list[dict]:
    """Every schedule, kept and freed, on this rank; gathered to rank 0."""
    import torch.distributed as dist

    rows = [_measure(name, free, config) for name in SCHEDULES for free in (False, True)]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, rows)  # JSON-able dicts of ints and strings only
    return [row for rank_rows in gathered for row in rank_rows]


def _measure(schedule: str, free: bool, config: dict) -> dict:
    import torch

    from trident.model.config import ModelConfig
    from trident.model.stage import build_stage
    from trident.parallel.pipeline.executor import run_pipeline
    from trident.parallel.pipeline.p2p import activation_shape
    from trident.parallel.topology import Topology
    from trident.training.memory import ActivationMeter

    topo = Topology.from_initialized(pp=config["pp"])
    vpp = config["vpp"] if schedule == "interleaved" else 1
    h, s, b, m = config["hidden"], config["seq"], config["micro_batch"], config["microbatches"]
    cfg = ModelConfig(vocab_size=1024, n_layers=config["layers"], hidden=h, n_heads=8, n_kv_heads=4,
                      ffn_hidden=4 * h, max_seq_len=s).validate()
    model = build_stage(cfg, topo, vpp=vpp)
    model.init_weights(0)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (m * b, s + 1), generator=gen)
    micro = [{"tokens": tokens[i * b : (i + 1) * b, :-1], "labels": tokens[i * b : (i + 1) * b, 1:]} for i in range(m)]
    with ActivationMeter(model) as meter:
        res = run_pipeline(model, topo, micro, act_shape=activation_shape(b, s, h), loss_divisor=m * b * s,
                           schedule=schedule, vpp=vpp, free_outputs=free)
    return {"schedule": schedule, "free": free, "rank": topo.pp_rank, "held": res.held_bytes_peak,
            "saved": meter.peak_bytes, "in_flight": res.peak_in_flight}


def format_report(rows: list[dict], config: dict) -> str:
    mib = 2**20
    lines = [
        f"trident bench stage-memory: pp {config['pp']}, {config['microbatches']} microbatches of "
        f"{config['micro_batch']}x{config['seq']} tokens, {config['layers']} layers, hidden {config['hidden']}, fp32, "
        f"interleaved with vpp {config['vpp']} (CPU, gloo)",
        "",
        f"{'schedule':<12} {'rank':>4} {'in flight':>9} {'stage in/out kept':>18} {'freed':>9} {'saved':>8}"
        f" {'autograd saved':>15}",
    ]
    by = {(r["schedule"], r["rank"], r["free"]): r for r in rows}
    for name in SCHEDULES:
        for rank in range(config["pp"]):
            kept, freed = by[(name, rank, False)], by[(name, rank, True)]
            lines.append(
                f"{name:<12} {rank:>4} {freed['in_flight']:>9} {kept['held'] / mib:>14.2f} MiB {freed['held'] / mib:>5.2f} MiB"
                f" {(kept['held'] - freed['held']) / mib:>4.2f} MiB {freed['saved'] / mib:>11.2f} MiB"
            )
    lines += ["", "in flight: (chunk, microbatch) pairs held at once; stage in/out: the executor's received inputs and "
              "outputs (kept until the backward, or freed once sent); autograd saved: the activation meter's peak."]
    return "\n".join(lines)
