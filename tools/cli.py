"""The `trident` command: one subcommand per job, each defined in its own module.

Subcommand modules expose ``register(subparsers)``, which adds a parser and sets
``func`` to the callable that runs it. They import torch and the library lazily inside
that callable, so ``trident --help`` answers without paying for ``import torch``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from trident.errors import UserError

# name -> module; the order is the order of `trident --help`.
SUBCOMMANDS: dict[str, str] = {
    "demo": "trident.tools.demo",
    "bench": "trident.tools.bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trident",
        description="trident: a Megatron-style 3D-parallel training engine for decoder-only LMs.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_name in SUBCOMMANDS.values():
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except UserError as err:  # a mistake the user can fix: one sentence, no traceback
        print(f"trident {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
