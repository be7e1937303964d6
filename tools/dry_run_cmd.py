"""`trident train --config C --dry-run --world N --rank R [--tp T --cp C --pp P] [--json] [overrides]`

Builds rank R of an N-rank job in this one process, with the real code and no
communication (torch's fake process-group backend, the meta device): its process groups,
model shard, ZeRO-sharded optimizer, data indices (with data.prefix) and checkpoint file
names; prints its parameter, gradient and optimizer bytes beside `trident plan`'s, the time
each part took, and the files it would write. dp is derived from N; ``parallel.ep=E``
builds the rank's E/ep experts and their dp/ep-sharded buckets. Exits 1 when the build
and the planner disagree (`trident.planning.dry_run`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from trident.errors import UserError

if TYPE_CHECKING:
    from trident.training.config import Config


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The dry run's flags on `trident train`."""
    p.add_argument("--dry-run", action="store_true",
                   help="build one rank of an N-rank job here, without communication, and report its bytes")
    p.add_argument("--world", type=int, default=None, help="with --dry-run: the simulated job's number of ranks")
    p.add_argument("--rank", type=int, default=None, help="with --dry-run: which of its ranks to build")
    p.add_argument("--json", action="store_true", help="with --dry-run: print the report as JSON")


def wanted(args: argparse.Namespace) -> bool:
    """Whether this `trident train` is a dry run; a dry-run flag without --dry-run is a mistake."""
    if args.dry_run:
        return True
    stray = [flag for flag, value in (("--world", args.world), ("--rank", args.rank), ("--json", args.json or None))
             if value is not None]
    if stray:
        raise UserError(f"{' and '.join(stray)} describe a dry run; add --dry-run (a real run takes its world and "
                        f"rank from the launcher)")
    return False


def run(cfg: "Config", args: argparse.Namespace) -> int:
    from trident.planning.dry_run import dry_run, format_report

    missing = [flag for flag, value in (("--world", args.world), ("--rank", args.rank)) if value is None]
    if missing:
        raise UserError(f"--dry-run needs {' and '.join(missing)}: the simulated job's size and the rank to build, "
                        f"e.g. --world 1024 --rank 0")
    if args.nproc is not None or args.resume:
        raise UserError("--dry-run builds one simulated rank in this process; drop --nproc and --resume")
    report = dry_run(cfg, args.world, args.rank, config_name=args.config)
    print(json.dumps(report.to_dict()) if args.json else format_report(report), flush=True)
    if report.mismatches:
        wrong = "; ".join(f"{k}: built {b:,}, planned {p:,}" for k, (b, p) in report.mismatches.items())
        print(f"trident train: error: the dry run and `trident plan` disagree for rank {args.rank} ({wrong}); "
              f"one of them is wrong, please report it", file=sys.stderr)
        return 1
    return 0
