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
    "train": "trident.tools.train",
    "demo": "trident.tools.demo",
    "plot": "trident.tools.plot",
    "checkpoint": "trident.tools.checkpoint_cmd",
    "export": "trident.tools.export_cmd",
    "import": "trident.tools.import_cmd",
    "generate": "trident.tools.generate_cmd",
    "plan": "trident.tools.plan",
    "bench": "trident.tools.bench",
    "preprocess": "trident.tools.preprocess",
    "tokenizer": "trident.tools.tokenizer_cmd",
    "corpus": "trident.tools.corpus_cmd",
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
    argv = list(sys.argv[1:] if argv is None else argv)
    # `section.key=value` overrides may sit anywhere among the options
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    args.argv = argv  # the command line as given, for relaunching it as N local ranks
    try:
        result = args.func(args)
    except UserError as err:  # a mistake the user can fix: one sentence, no traceback
        print(f"trident {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outputs are written atomically; nothing to clean up here
        print(f"trident {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
