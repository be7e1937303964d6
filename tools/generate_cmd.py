"""`trident generate --checkpoint DIR --prompt TEXT [options]`: continue a prompt with a trained model.

The checkpoint may have been saved at any (tp, pp, dp) layout; its tokenizer is found
from what the run recorded (or --tokenizer). One process reads every tensor whole;
under torchrun (or with --nproc N) the model is tensor-parallel over all ranks (tp =
world size), each rank reading only its slices. The text goes to stdout, the timing
(and with --draft-checkpoint the draft's acceptance rate) to stderr. The work happens in
``trident.inference.generate``.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="generate text from a checkpoint (sampling, KV cache, tensor parallel, speculative)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="a step_NNNNNNN folder, a checkpoints folder or a run folder")
    p.add_argument("--prompt", required=True, help="text to continue ('' starts a new document)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = all (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1]; 1 = off (default)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: a random one)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--draft-checkpoint", default=None, help="a small model that proposes tokens (speculative decoding)")
    p.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes per step (default 4)")
    p.add_argument("--tokenizer", default=None, help="tokenizer to use instead of the one the checkpoint records")
    p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-document token")
    p.add_argument("--no-cache", action="store_true", help="re-run the whole sequence every step (slow; a check)")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (cuda when available; default)")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16 (default fp32)")
    p.add_argument("--nproc", type=int, default=None, help="run tensor-parallel on this many local ranks")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from trident.errors import UserError
    from trident.tools.launch import launch_local, under_launcher

    if args.nproc is not None and args.nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {args.nproc}")
    if args.draft_checkpoint is not None and args.no_cache:
        raise UserError("--draft-checkpoint needs the KV cache; drop --no-cache")
    device = args.device
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {device!r} is not valid; use cpu, cuda or auto")
    if not under_launcher() and args.nproc is not None and args.nproc > 1:
        return launch_local(args.nproc, args.argv)

    import torch

    from trident.inference.generate import generate_text
    from trident.inference.sampling import SamplingConfig
    from trident.parallel.topology import Topology
    from trident.parallel.zero.mixed_precision import parse_dtype

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was given but no CUDA device is available; use --device cpu")
    dtype = parse_dtype(args.dtype)
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        greedy=args.greedy, seed=args.seed, stop_at_eod=not args.no_stop, draft_tokens=args.draft_tokens,
    ).validate()
    if under_launcher():
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        topo = Topology.from_env(tp=int(os.environ["WORLD_SIZE"]), device=device)
    else:
        topo = Topology.single(device)
    try:
        result = generate_text(args.checkpoint, args.prompt, sampling, args.draft_checkpoint, args.tokenizer, topo,
                               dtype, use_cache=not args.no_cache)
    finally:
        if under_launcher():
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    if topo.rank == 0:
        print(args.prompt + result.text, flush=True)
        where = f"tp={topo.tp} on {topo.device}"
        print(f"trident generate ({where}): {result.summary()}", file=sys.stderr, flush=True)
    return 0
