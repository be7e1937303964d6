"""`trident demo`: a short tensor- and data-parallel training run on real text.

It trains a tiny llama-style model on bytes of the Python standard library's own sources
(present wherever Python is) for a few steps at the layout asked for, and prints the loss
falling. It is the foundation's end-to-end check of the parallel layers on several
processes; `trident train` (configs, data pipeline, checkpoints) builds on the same parts.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="train a tiny model for a few steps on several local ranks")
    p.add_argument("--nproc", type=int, default=4, help="local ranks to start (ignored under torchrun)")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size; dp = nproc / tp")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--global-batch", type=int, default=8, help="sequences per step over all dp ranks")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trident.tools.launch import launch_local, under_launcher

    if not under_launcher() and args.nproc > 1:
        return launch_local(args.nproc, args.argv)
    return _rank_main(args)


def stdlib_bytes(limit: int = 2_000_000) -> bytes:
    """The first `limit` bytes of the stdlib's .py sources, in sorted path order."""
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    out = bytearray()
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        out += path.read_bytes()
        if len(out) >= limit:
            break
    return bytes(out[:limit])


def _rank_main(args: argparse.Namespace) -> int:
    import time

    import torch

    from trident.errors import UserError
    from trident.model.config import ModelConfig
    from trident.model.gpt import GPT
    from trident.parallel.layers import sync_tp_partial_grads
    from trident.parallel.mappings import all_reduce
    from trident.parallel.random import RNGStreams
    from trident.parallel.topology import Topology, resolve_layout
    from trident.tools.launch import under_launcher

    torch.set_num_threads(1)
    cfg = ModelConfig(vocab_size=256, n_layers=2, hidden=128, n_heads=8, n_kv_heads=4, ffn_hidden=256, max_seq_len=args.seq_len)
    if under_launcher():
        import os

        resolve_layout(int(os.environ["WORLD_SIZE"]), args.tp)  # same error on every rank, before any group
        cfg.check_tp(args.tp)
        topo = Topology.from_env(tp=args.tp)
    else:
        topo = Topology.single()
    if args.global_batch % topo.dp != 0:
        raise UserError(f"--global-batch {args.global_batch} does not divide by dp={topo.dp}")
    rng = RNGStreams(args.seed, topo)
    model = GPT(cfg, topo, sequence_parallel=args.sequence_parallel, rng=rng)
    model.init_weights(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    text = torch.frombuffer(bytearray(stdlib_bytes()), dtype=torch.uint8).long()
    gen = torch.Generator().manual_seed(args.seed)
    local = args.global_batch // topo.dp
    if topo.rank == 0:
        print(f"trident demo: {topo.world} ranks (tp={topo.tp}, dp={topo.dp}), {cfg.num_parameters():,} parameters, "
              f"{len(text):,} bytes of stdlib source", flush=True)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        # the same global batch on every rank; each dp rank takes its own rows
        offsets = torch.randint(0, len(text) - args.seq_len - 1, (args.global_batch,), generator=gen)
        rows = torch.stack([text[o : o + args.seq_len + 1] for o in offsets.tolist()])
        rows = rows[topo.dp_rank * local : (topo.dp_rank + 1) * local]
        tokens, labels = rows[:, :-1], rows[:, 1:]
        loss_sum = model(tokens, labels=labels).sum()
        (loss_sum / (args.global_batch * args.seq_len)).backward()  # per-token mean over the global batch
        sync_tp_partial_grads(model, topo)
        for p in model.parameters():
            all_reduce(p.grad, topo.dp_group)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = all_reduce(loss_sum.detach().clone(), topo.dp_group).item() / (args.global_batch * args.seq_len)
        if topo.rank == 0 and (step == 1 or step % 5 == 0 or step == args.steps):
            print(f"step {step:4d}  loss {loss:.4f}  ({time.perf_counter() - start:.1f} s)", flush=True)
    if under_launcher():
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0
