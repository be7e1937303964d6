"""`trident preprocess`: corpus files -> a Megatron-compatible .bin/.idx pair (or merge pairs).

The work happens in ``trident.data.preprocess``; this module only maps arguments onto it.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "preprocess",
        help="tokenize JSONL/text corpora into a memory-mapped indexed dataset",
        description=(
            "Tokenize JSONL or plain-text files (folders, globs and .gz accepted) into PREFIX.bin and "
            "PREFIX.idx in Megatron-LM's MMIDIDX format, or merge existing datasets with --merge."
        ),
    )
    parser.add_argument("--input", nargs="+", metavar="PATH", help="files, folders or glob patterns")
    parser.add_argument("--output-prefix", required=True, help="write PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer", metavar="MODEL", help="a sentencepiece .model or a Hugging Face tokenizer.json")
    parser.add_argument("--json-key", default="text", help="JSONL field holding the text (a string or a list of strings)")
    parser.add_argument(
        "--workers", type=int, default=1, help="tokenizer processes (default 1: a thread per core, in process)"
    )
    parser.add_argument("--append-eod", action="store_true", help="end every document with the EOD token")
    parser.add_argument("--skip-bad-lines", action="store_true", help="skip and count malformed lines instead of stopping")
    parser.add_argument("--text-per-line", action="store_true", help="in plain-text files, each line is a document")
    parser.add_argument("--eod-token", default=None, help="name of the EOD token in a Hugging Face tokenizer")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--merge", nargs="+", metavar="PREFIX", help="instead of tokenizing, concatenate these datasets into the output"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trident.errors import UserError

    if args.merge:
        if args.input or args.tokenizer:
            raise UserError("--merge takes dataset prefixes only; drop --input and --tokenizer.")
        from trident.data.indexed import merge_datasets

        merged = merge_datasets(args.merge, args.output_prefix)
        print(
            f"merged {len(args.merge)} datasets into {merged.prefix}.bin/.idx: "
            f"{merged.num_documents} documents, {len(merged)} sequences, {merged.num_tokens} tokens"
        )
        return 0
    if not args.input or not args.tokenizer:
        raise UserError("preprocess needs --input PATH... and --tokenizer MODEL (or --merge PREFIX...).")
    from trident.data.preprocess import preprocess

    stats = preprocess(
        args.input,
        args.output_prefix,
        args.tokenizer,
        json_key=args.json_key,
        workers=args.workers,
        append_eod=args.append_eod,
        skip_bad_lines=args.skip_bad_lines,
        text_per_line=args.text_per_line,
        eod_token=args.eod_token,
        progress=not args.quiet,
    )
    print(stats.summary())
    return 0
