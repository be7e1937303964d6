"""`trident export --checkpoint DIR --format hf --output OUT`: a checkpoint as a Hugging Face folder.

Llama-style models (RMSNorm, RoPE, SwiGLU) become a ``LlamaForCausalLM`` folder and
GPT-2-style ones (LayerNorm, learned positions, GeLU) a ``GPT2LMHeadModel`` folder:
``config.json``, ``model.safetensors`` (sharded with an index past --max-shard-size),
and the tokenizer, so ``AutoModelForCausalLM`` and ``AutoTokenizer`` load OUT as is.
The checkpoint may have been saved at any (tp, pp, dp) layout. The work happens in
``trident.checkpoint.hf_checkpoint``.
"""

from __future__ import annotations

import argparse

FORMATS = ("hf",)
SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="export a checkpoint to another format (Hugging Face Llama / GPT-2)", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="a step_NNNNNNN folder, a checkpoints folder or a run folder")
    p.add_argument("--format", default="hf", help="output format; only 'hf' (Hugging Face transformers)")
    p.add_argument("--output", required=True, help="folder to write (created when missing)")
    p.add_argument("--tokenizer", default=None, help="tokenizer to include, instead of the one the checkpoint records")
    p.add_argument("--no-tokenizer", action="store_true", help="export the weights and config only")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: as stored in the checkpoint)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB (default 5GB)")
    p.set_defaults(func=run)


def parse_size(text: str) -> int:
    """Bytes of a size such as '5GB', '500MB', '2GiB' or '1000000'."""
    from trident.errors import UserError

    s = text.strip().upper()
    for unit in sorted(SIZE_UNITS, key=len, reverse=True):
        if s.endswith(unit):
            number, scale = s[: -len(unit)], SIZE_UNITS[unit]
            break
    else:
        number, scale = s, 1
    try:
        value = int(float(number) * scale)
    except ValueError:
        value = 0
    if value <= 0:
        raise UserError(f"--max-shard-size {text!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
    return value


def run(args: argparse.Namespace) -> int:
    from trident.checkpoint.hf_checkpoint import describe, export_checkpoint
    from trident.checkpoint.state import read_state
    from trident.errors import UserError
    from trident.parallel.zero.mixed_precision import parse_dtype

    if args.format not in FORMATS:
        raise UserError(f"--format {args.format!r} is not supported; valid formats are {', '.join(FORMATS)}")
    if args.no_tokenizer and args.tokenizer is not None:
        raise UserError("--tokenizer and --no-tokenizer contradict each other; give one of them")
    dtype = parse_dtype(args.dtype) if args.dtype is not None else None
    result = export_checkpoint(
        args.checkpoint, args.output, tokenizer=args.tokenizer, with_tokenizer=not args.no_tokenizer, dtype=dtype,
        max_shard_bytes=parse_size(args.max_shard_size),
    )
    cfg = read_state(result.checkpoint).model_config()
    arch = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[result.architecture]
    print(f"exported {result.checkpoint} ({describe(cfg)}) as {arch} to {result.output}")
    print(f"  tokenizer: {result.tokenizer if result.tokenizer is not None else 'none'}")
    for name in result.files:
        print(f"  {name}  {(result.output / name).stat().st_size:,} bytes")
    return 0
