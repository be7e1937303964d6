"""`trident import --hf DIR --output CKPT_DIR`: a Hugging Face Llama or GPT-2 folder as a trident checkpoint.

The folder must hold ``config.json`` and safetensors weights (``model.safetensors`` or
shards with their index); pickle files (``pytorch_model.bin``) are never loaded. The
result is ``CKPT_DIR/step_0000000`` with ``CKPT_DIR/latest``: the checkpoint format the
trainer writes, which loads at any (tp, pp, dp) layout. Use ``--output RUN_DIR/checkpoints``
to continue training with ``trident train --run-dir RUN_DIR --resume`` (same model
config), or give CKPT_DIR to ``trident generate`` and ``trident export``.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "import", help="import a Hugging Face Llama / GPT-2 folder as a trident checkpoint", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--hf", required=True, metavar="DIR", help="Hugging Face model folder (config.json + safetensors)")
    p.add_argument("--output", required=True, metavar="CKPT_DIR", help="checkpoints folder to create")
    p.add_argument("--seed", type=int, default=0, help="seed recorded for the RNG streams (dropout)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trident.checkpoint.hf_checkpoint import describe, import_checkpoint
    from trident.checkpoint.state import read_state

    path = import_checkpoint(args.hf, args.output, seed=args.seed)
    state = read_state(path)
    print(f"imported {args.hf} ({describe(state.model_config())}) to {path}")
    print(f"  tokenizer: {state.tokenizer or 'none found in the folder'}")
    return 0
