"""`trident checkpoint inspect DIR`: what a checkpoint holds, with its checksums verified."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("checkpoint", help="inspect and verify checkpoints")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    inspect = sub.add_parser("inspect", help="print step, layout, tensors; verify every file's sha256")
    inspect.add_argument("path", help="a checkpoint folder (step_NNNNNNN) or a run's checkpoints folder")
    inspect.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from trident.checkpoint.offline import inspect_checkpoint
    from trident.checkpoint.store import LATEST, complete_checkpoints
    from trident.errors import UserError

    path = Path(args.path)
    if not path.exists():
        raise UserError(f"{str(path)!r} does not exist")
    if (path / LATEST).is_file() or not (path / "meta.json").exists():
        found = complete_checkpoints(path)
        if not found:
            raise UserError(f"{str(path)!r} is neither a checkpoint nor a folder of checkpoints")
        path = found[-1]
    info = inspect_checkpoint(path)
    state, lay = info.state, info.state.layout
    print(f"checkpoint {path}")
    print(f"  step {state.step}, consumed samples {state.consumed_samples}")
    print(f"  saved at tp={lay.tp} pp={lay.pp} dp={lay.dp} (world {lay.world}), zero {lay.zero}")
    print(f"  {len(state.files)} files, sha256 verified:")
    for name in sorted(state.files):
        print(f"    {name}  {(path / name).stat().st_size:,} bytes  {state.files[name][:16]}")
    total = 0
    print(f"  {len(info.tensors)} model tensors:")
    for name in sorted(info.tensors, key=_natural):
        shape, nbytes = info.tensors[name]
        total += nbytes
        print(f"    {name:48s} {str(tuple(shape)):>16s}  {nbytes:,} bytes")
    print(f"  model bytes {total:,}")
    return 0


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.split(".")]
