"""`trident bench checkpoint`: save and load speed of a checkpoint, in GB/s, at a given layout.

It starts tp*pp*dp local gloo processes, builds the model (a preset or a config's model
section) and the distributed optimizer at that layout, and times `save_checkpoint` --
every rank writing its safetensors files, the sha256 of each, the metadata, the rename
and ``latest`` -- over `--repeats` saves. A second set of processes, at the same layout
or at the one given with ``--load-tp/--load-pp/--load-dp`` (a resharding load), times
what a resume does: verifying every file's sha256 on rank 0, then `load_model` and
`load_optimizer` on every rank. GB/s is the checkpoint's bytes on disk (model +
optimizer + RNG files) over the wall time of the slowest rank.

The load reads files that were just written, so they usually come from the operating
system's page cache: the figures then measure trident's own cost, not the disk. Drop
the caches between the phases (or use --dir on another disk) for cold reads.

Run it as ``trident bench checkpoint ...``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

GB = 1e9


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "checkpoint", help="checkpoint save and load GB/s for a model size and layout",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="gpt2-124m", help="model preset: tiny, gpt2-124m, llama-1b, llama-8b")
    parser.add_argument("--config", default=None, help="a training YAML whose model section is used (instead of --preset)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the saving job")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the saving job")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size of the saving job")
    parser.add_argument("--zero", type=int, default=1, help="ZeRO stage of the optimizer (0, 1, 2)")
    parser.add_argument("--load-tp", type=int, default=None, help="tp of the loading job (default: --tp)")
    parser.add_argument("--load-pp", type=int, default=None, help="pp of the loading job (default: --pp)")
    parser.add_argument("--load-dp", type=int, default=None, help="dp of the loading job (default: --dp)")
    parser.add_argument("--dtype", default="fp32", help="model dtype: fp32 | bf16 | fp16")
    parser.add_argument("--repeats", type=int, default=3, help="timed saves and loads (the median is printed)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder, deleted after)")
    parser.add_argument("overrides", nargs="*", metavar="model.key=value", help="model overrides, e.g. model.n_layers=4")
    parser.set_defaults(func=run)


def model_config(args: argparse.Namespace) -> dict:
    """The benchmarked model's config as a dict, from --config or --preset plus overrides."""
    import dataclasses

    import yaml

    from trident.errors import UserError
    from trident.model.config import preset
    from trident.training.config import load_config

    overrides = list(getattr(args, "overrides", []) or [])
    bad = [o for o in overrides if not o.startswith("model.") or "=" not in o]
    if bad:
        raise UserError(f"override {bad[0]!r} is not of the form model.key=value")
    if args.config is not None:
        return load_config(args.config, overrides).model.to_dict()
    cfg = preset(args.preset)
    fields = {f.name for f in dataclasses.fields(cfg)}
    changes = {}
    for o in overrides:
        key, _, value = o[len("model."):].partition("=")
        if key not in fields:
            raise UserError(f"model.{key} is not a model setting; valid keys are {', '.join(sorted(fields))}")
        changes[key] = yaml.safe_load(value)
    return dataclasses.replace(cfg, **changes).validate().to_dict()


def run(args: argparse.Namespace) -> int:
    """Check the arguments, save in one set of processes, load in another, print a table."""
    import torch.multiprocessing as mp

    from trident.errors import UserError
    from trident.model.config import ModelConfig
    from trident.parallel.pipeline.stages import stage_layers
    from trident.parallel.topology import resolve_layout
    from trident.parallel.zero.mixed_precision import parse_dtype

    parse_dtype(args.dtype)
    if args.zero not in (0, 1, 2):
        raise UserError(f"--zero must be 0, 1 or 2, got {args.zero}")
    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    model = model_config(args)
    cfg = ModelConfig(**model)
    save = (args.tp, args.pp, args.dp)
    load = (args.load_tp or args.tp, args.load_pp or args.pp, args.load_dp or args.dp)
    for tp, pp, dp in (save, load):
        resolve_layout(tp * pp * dp, tp, pp, dp)
        cfg.check_tp(tp)
        stage_layers(cfg.n_layers, pp, None)
    if args.dir is not None:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="trident-bench-ckpt-", dir=args.dir))
    config = {"model": model, "dtype": args.dtype, "zero": args.zero, "repeats": args.repeats, "root": str(work / "ckpt")}
    try:
        results = {}
        for phase, (tp, pp, dp) in (("save", save), ("load", load)):
            store = Path(tempfile.mkdtemp(prefix="store-", dir=work))
            world = tp * pp * dp
            mp.start_processes(_rank_main, args=(world, (tp, pp, dp), phase, config, str(store)), nprocs=world,
                               start_method="spawn")
            results[phase] = json.loads((store / "result.json").read_text())
        print(format_report(results, config, save, load, args.dir or "a temporary folder"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _rank_main(rank: int, world: int, layout: tuple[int, int, int], phase: str, config: dict, store: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}/store", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=1800),
    )
    try:
        result = _measure(layout, phase, config)
        if rank == 0:
            (Path(store) / "result.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _build(layout: tuple[int, int, int], config: dict, init: bool):
    import torch

    from trident.model.config import ModelConfig
    from trident.model.stage import build_stage
    from trident.parallel.random import RNGStreams
    from trident.parallel.topology import Topology
    from trident.parallel.zero.mixed_precision import MixedPrecisionConfig, parse_dtype
    from trident.parallel.zero.optimizer import DistributedOptimizer, OptimizerConfig

    tp, pp, dp = layout
    topo = Topology.from_initialized(tp=tp, pp=pp, dp=dp)
    cfg = ModelConfig(**config["model"])
    model = build_stage(cfg, topo, dtype=parse_dtype(config["dtype"]))
    if init:
        model.init_weights(0)
    else:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
    precision = MixedPrecisionConfig(dtype=config["dtype"])
    opt = DistributedOptimizer(model, topo, OptimizerConfig(zero=config["zero"]), precision)
    return topo, model, opt, RNGStreams(0, topo)


def _slowest(seconds: float) -> float:
    """The largest of every rank's time: a collective operation ends with its slowest rank."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _measure(layout: tuple[int, int, int], phase: str, config: dict) -> dict:
    """Median seconds (slowest rank) of the whole save or load, and of its parts."""
    import torch.distributed as dist

    from trident.checkpoint import checkpoint as ckpt

    root = Path(config["root"])
    topo, model, opt, rng = _build(layout, config, init=phase == "save")
    parts: dict[str, list[float]] = {}

    def timed(name: str, fn) -> object:
        start = time.perf_counter()
        out = fn()
        parts.setdefault(name, []).append(_slowest(time.perf_counter() - start))
        return out

    for i in range(config["repeats"]):
        dist.barrier()
        if phase == "save":
            path = timed("total", lambda: ckpt.save_checkpoint(root, i + 1, topo, model, opt, rng,
                                                               ckpt.RunState(), keep=0))
            timed("optimizer state_dict", opt.state_dict)  # the part of a save spent gathering optimizer state
            if topo.rank == 0 and i > 0:  # outside the timing: keep one checkpoint on disk
                shutil.rmtree(root / ckpt.step_dir_name(i))
        else:
            path = ckpt.complete_checkpoints(root)[-1]
            start = time.perf_counter()
            timed("verify (rank 0)", lambda: ckpt.verify(path) if topo.rank == 0 else None)
            timed("load_model", lambda: ckpt.load_model(path, model))
            timed("load_optimizer", lambda: ckpt.load_optimizer(path, opt))
            parts.setdefault("total", []).append(_slowest(time.perf_counter() - start))
    files = {p.name: p.stat().st_size for p in path.iterdir() if p.is_file()}
    return {
        "seconds": {name: statistics.median(values) for name, values in parts.items()},
        "bytes": sum(files.values()),
        "model_bytes": sum(n for f, n in files.items() if f.startswith("model_")),
        "optim_bytes": sum(n for f, n in files.items() if f.startswith("optim_")),
        "files": len(files),
    }


def format_report(results: dict, config: dict, save: tuple, load: tuple, where: str) -> str:
    from trident.model.config import ModelConfig

    cfg = ModelConfig(**config["model"])
    s, ld = results["save"], results["load"]
    total, model_b, optim_b = s["bytes"], s["model_bytes"], s["optim_bytes"]
    lay = lambda t: f"tp={t[0]} pp={t[1]} dp={t[2]}"  # noqa: E731
    rate = lambda nbytes, seconds: f"{nbytes / GB / seconds:7.2f}" if seconds > 0 else "      -"  # noqa: E731
    rows = [
        ("save", lay(save), "total", s["seconds"]["total"], total),
        ("", "", "of it optimizer state_dict", s["seconds"]["optimizer state_dict"], optim_b),
        ("load", lay(load) + (" (reshard)" if save != load else ""), "total", ld["seconds"]["total"], total),
        ("", "", "verify sha256 (rank 0)", ld["seconds"]["verify (rank 0)"], total),
        ("", "", "load_model", ld["seconds"]["load_model"], model_b),
        ("", "", "load_optimizer", ld["seconds"]["load_optimizer"], optim_b),
    ]
    lines = [
        f"trident bench checkpoint: {cfg.n_layers} layers x {cfg.hidden} wide, vocab {cfg.vocab_size}, "
        f"{cfg.num_parameters() / 1e6:.1f} M parameters, {config['dtype']}, zero {config['zero']}; "
        f"median of {config['repeats']}, slowest rank (gloo, CPU processes, files in {where})",
        f"checkpoint: {total / GB:.3f} GB in {s['files']} files (model {model_b / GB:.3f} GB, "
        f"optimizer {optim_b / GB:.3f} GB)",
        "",
        f"{'phase':<6} {'layout':<28} {'part':<28} {'seconds':>8} {'GB/s':>7}",
    ]
    for phase, layout, part, seconds, nbytes in rows:
        lines.append(f"{phase:<6} {layout:<28} {part:<28} {seconds:>8.3f} {rate(nbytes, seconds)}")
    lines += [
        "",
        "save = every rank's safetensors files + their sha256 + meta.json + rename + latest (the optimizer "
        "state_dict row is timed separately, as a share of it); load = what a resume does. GB/s = bytes of the "
        "files involved / seconds. Loads read freshly written files, usually from the page cache.",
    ]
    return "\n".join(lines)

