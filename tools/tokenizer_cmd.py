"""`trident tokenizer`: train a sentencepiece model, or inspect and try a tokenizer."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tokenizer", help="train or inspect a tokenizer")
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    sub.required = True

    train = sub.add_parser(
        "train",
        help="train a sentencepiece model (byte fallback; <unk>=0 <s>=1 </s>=2 <pad>=3)",
        description="Train a sentencepiece model on JSONL or text files and write PREFIX.model.",
    )
    train.add_argument("--input", nargs="+", required=True, metavar="PATH", help="files, folders or glob patterns")
    train.add_argument("--vocab-size", type=int, required=True, help="number of pieces, including specials")
    train.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    train.add_argument("--output", required=True, metavar="PREFIX", help="write PREFIX.model and PREFIX.vocab")
    train.add_argument("--json-key", default="text", help="JSONL field holding the text")
    train.add_argument("--text-per-line", action="store_true", help="in plain-text files, each line is a document")
    train.add_argument("--max-sentences", type=int, default=2_000_000, help="sample at most this many training pieces")
    train.set_defaults(func=run_train)

    info = sub.add_parser("info", help="print the vocabulary size and special ids")
    info.add_argument("model", help="a sentencepiece .model or a Hugging Face tokenizer.json")
    info.set_defaults(func=run_info)

    encode = sub.add_parser("encode", help="print the ids (and pieces) of a text")
    encode.add_argument("model", help="a sentencepiece .model or a Hugging Face tokenizer.json")
    encode.add_argument("text")
    encode.set_defaults(func=run_encode)


def run_train(args: argparse.Namespace) -> int:
    from trident.data.sources import iter_texts
    from trident.data.tokenizer import load_tokenizer, train_sentencepiece

    path = train_sentencepiece(
        iter_texts(args.input, json_key=args.json_key, text_per_line=args.text_per_line),
        args.output,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        max_sentences=args.max_sentences,
    )
    print(f"wrote {path}: {load_tokenizer(path).describe()}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from trident.data.tokenizer import load_tokenizer

    print(load_tokenizer(args.model).describe())
    return 0


def run_encode(args: argparse.Namespace) -> int:
    from trident.data.tokenizer import load_tokenizer

    tok = load_tokenizer(args.model)
    ids = tok.encode(args.text)
    print(" ".join(str(i) for i in ids))
    print(" | ".join(repr(tok.decode([i])) for i in ids))
    return 0
