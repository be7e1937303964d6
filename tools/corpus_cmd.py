"""`trident corpus`: the default stdlib corpus, and a look inside an indexed dataset."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("corpus", help="write the default corpus; describe an indexed dataset")
    sub = parser.add_subparsers(dest="corpus_command", metavar="ACTION")
    sub.required = True

    stdlib = sub.add_parser(
        "stdlib",
        help="collect this Python's standard-library sources into JSONL",
        description=(
            "Write one JSON line {path, text} per standard-library .py file of the running interpreter "
            "(site-packages excluded), in sorted order: the same bytes wherever the same Python is installed."
        ),
    )
    stdlib.add_argument("--output", required=True, help="the JSONL file to write")
    stdlib.add_argument("--include", nargs="+", metavar="GLOB", help="only paths matching these globs, e.g. 'json/*.py'")
    stdlib.add_argument("--limit", type=int, default=None, help="at most this many files (after sorting)")
    stdlib.set_defaults(func=run_stdlib)

    info = sub.add_parser("info", help="sequences, documents, tokens and dtype of PREFIX.bin/.idx")
    info.add_argument("prefix")
    info.set_defaults(func=run_info)


def run_stdlib(args: argparse.Namespace) -> int:
    from trident.data.corpus import stdlib_root, write_stdlib_corpus

    stats = write_stdlib_corpus(args.output, include=args.include, limit=args.limit)
    print(
        f"wrote {args.output}: {stats.files} files, {stats.bytes / 1e6:.2f} MB from {stdlib_root()} "
        f"({stats.skipped} not UTF-8, skipped)"
    )
    return 0


def run_info(args: argparse.Namespace) -> int:
    from trident.data.indexed import IndexedDataset

    ds = IndexedDataset(args.prefix)
    lengths = ds.sequence_lengths
    mean = float(lengths.mean()) if len(lengths) else 0.0
    print(
        f"{ds.prefix}: {ds.num_documents} documents, {len(ds)} sequences, {ds.num_tokens} tokens, "
        f"dtype {ds.dtype}, mean sequence {mean:.1f} tokens"
    )
    return 0
