"""`trident train --config FILE.yaml [--tp N] [--cp N] [--pp N] [--dp N] [--nproc N] [--run-dir DIR] [section.key=value ...]`

Under torchrun (or any launcher that sets RANK/WORLD_SIZE/...) this process is one rank.
Outside a launcher, `--nproc N` starts N local ranks through torch's elastic launcher with
the same arguments; without `--nproc` it trains as a single process. `--dry-run --world N
--rank R` builds rank R of an N-rank job here instead, without training (tools/dry_run_cmd.py).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from trident.tools import dry_run_cmd


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model (one rank under torchrun, or N local ranks with --nproc)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None, help="YAML config (see configs/); defaults apply when omitted")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size (parallel.tp)")
    p.add_argument("--pp", type=int, default=None, help="pipeline-parallel size (parallel.pp)")
    p.add_argument("--cp", type=int, default=None, help="context-parallel size (parallel.cp): ranks per sequence")
    p.add_argument("--dp", type=int, default=None, help="data-parallel size (parallel.dp); derived when unset")
    p.add_argument("--nproc", type=int, default=None, help="start this many local ranks (outside torchrun)")
    p.add_argument("--run-dir", default=None, help="where metrics, the resolved config and checkpoints go")
    p.add_argument("--resume", action="store_true", help="continue from the run dir's latest checkpoint")
    p.add_argument("--max-restarts", type=int, default=0, help="with --nproc: restart failed ranks this often")
    p.add_argument("--print-config", action="store_true",
                   help="also print the whole resolved config as JSON (it is always written to RUN_DIR/config.json)")
    dry_run_cmd.add_arguments(p)
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.steps=100")
    p.set_defaults(func=run)


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """The flag shortcuts (--tp/--cp/--pp/--dp) as config overrides, after the positional ones."""
    extra = list(args.overrides)
    for name in ("tp", "pp", "dp", "cp"):
        value = getattr(args, name)
        if value is not None:
            extra.append(f"parallel.{name}={value}")
    return extra


def run(args: argparse.Namespace) -> int:
    from trident.errors import UserError
    from trident.tools.launch import launch_local, report_rank_error, stop_line, under_launcher
    from trident.training.config import load_config

    # validate the config before starting any rank: one message, once
    cfg = load_config(args.config, overrides_from_args(args))
    if dry_run_cmd.wanted(args):
        return dry_run_cmd.run(cfg, args)
    if not under_launcher() and args.nproc is not None and args.nproc > 1:
        from trident.training.config import derive

        derive(cfg, args.nproc)
        from trident.training.trainer import DEFAULT_RUN_DIR

        checkpoints = Path(args.run_dir or DEFAULT_RUN_DIR) / "checkpoints"
        return launch_local(args.nproc, args.argv, max_restarts=args.max_restarts, checkpoints=checkpoints)
    from trident.training.trainer import train

    try:
        summary = train(cfg, run_dir=args.run_dir, resume=args.resume, print_config=args.print_config)
    except UserError as err:  # a rank of `--nproc N`: the launcher prints it, once for all ranks
        if not report_rank_error(err):
            raise
        return 2
    if summary.stopped_by == "signal" and summary.signal and not under_launcher():
        signum = signal.Signals[summary.signal]  # a requested stop exits 128 + signal, as `--nproc N` does
        print(stop_line("train", signum, Path(summary.run_dir) / "checkpoints"), file=sys.stderr, flush=True)
        return 128 + signum
    return 0
