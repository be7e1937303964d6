"""`trident demo`: the README's main command.

It is `trident train --config configs/demo.yaml --nproc 8 --tp 2 --pp 2` (8 local CPU
ranks: tensor, pipeline and data parallel at once) into a fresh run dir, followed by a
short sample generated from the final checkpoint. The first run builds the default corpus
(the Python standard library's sources), trains a sentencepiece tokenizer and
preprocesses the corpus under `data.work_dir`; later runs reuse all three.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="train the demo model on 8 local ranks (tp=2, pp=2, dp=2), then generate a sample",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--nproc", type=int, default=8, help="local ranks to start")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=2, help="pipeline-parallel size; dp = nproc / (tp * pp)")
    p.add_argument("--run-dir", default=None, help="default: runs/demo-<date>-<time>")
    p.add_argument("--prompt", default="def ", help="start of the generated sample")
    p.add_argument("--max-new-tokens", type=int, default=60)
    p.add_argument("--print-config", action="store_true", help="also print the whole resolved config as JSON")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.steps=50")
    p.set_defaults(func=run)


def demo_config() -> Path:
    import trident

    return Path(trident.__file__).resolve().parent / "configs" / "demo.yaml"


def run(args: argparse.Namespace) -> int:
    from trident.tools.launch import launch_local, under_launcher
    from trident.training.config import derive, load_config

    if under_launcher():
        from trident.errors import UserError

        raise UserError("trident demo starts its own ranks; under torchrun run `trident train --config configs/demo.yaml`")
    run_dir = Path(args.run_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    train_argv = ["train", "--config", str(demo_config()), "--tp", str(args.tp), "--pp", str(args.pp),
                  "--run-dir", str(run_dir), *(["--print-config"] if args.print_config else []), *args.overrides]
    cfg = load_config(demo_config(), [*args.overrides, f"parallel.tp={args.tp}", f"parallel.pp={args.pp}"])
    derive(cfg, args.nproc)  # a layout that does not divide fails here, before any rank starts
    print(f"trident demo: training {demo_config().name} on {args.nproc} local ranks "
          f"(tp={args.tp}, pp={args.pp}, dp={args.nproc // (args.tp * args.pp)}) into {run_dir}", flush=True)
    if args.nproc > 1:
        if launch_local(args.nproc, train_argv) != 0:
            return 1
    else:
        from trident.training.trainer import train

        train(cfg, run_dir=run_dir, print_config=args.print_config)
    return _sample(run_dir, args, cfg.train.steps)


def _shown_path(path: Path) -> str:
    """A path as a user would type it here: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def next_commands(run_dir: Path, args: argparse.Namespace, steps: int) -> list[str]:
    """The commands a user tries after the demo, for this run: its curves, more samples,
    and more training (a run dir with a checkpoint resumes; `train.steps` is where to stop)."""
    run = _shown_path(run_dir)
    overrides = [o for o in args.overrides if not o.startswith("train.steps=")]
    nproc = ["--nproc", str(args.nproc)] if args.nproc > 1 else []
    more = ["trident", "train", "--config", _shown_path(demo_config()), *nproc, "--tp", str(args.tp),
            "--pp", str(args.pp), "--run-dir", run, *overrides, f"train.steps={2 * steps}"]
    return [
        "next:",
        f"  # loss and learning-rate curves -> {run}/curves.png",
        f"  trident plot {shlex.quote(run)}",
        "  # more samples from the final checkpoint",
        f"  trident generate --checkpoint {shlex.quote(run + '/checkpoints')} --prompt {shlex.quote(args.prompt)}"
        " --temperature 0.8 --top-k 40",
        f"  # train on from the last checkpoint (step {steps}) to step {2 * steps}",
        "  " + shlex.join(more),
    ]


def _sample(run_dir: Path, args: argparse.Namespace, steps: int) -> int:
    from trident.inference.generate import generate_from_checkpoint

    latest = run_dir / "checkpoints"
    if not (latest / "latest").exists():
        print("trident demo: no checkpoint was written (checkpoint.interval=-1?), so no sample", flush=True)
        return 0
    text = generate_from_checkpoint(latest, args.prompt, max_new_tokens=args.max_new_tokens, temperature=0.8,
                                    top_k=40, seed=0)
    print(f"\nsample from {run_dir / 'checkpoints'} (temperature 0.8, top-k 40):\n{text}\n", flush=True)
    print(f"metrics: {run_dir / 'metrics.jsonl'}\n", flush=True)
    print("\n".join(next_commands(run_dir, args, steps)), flush=True)
    return 0
