"""`trident bench checkpoint`: save and load speed of a checkpoint, in GB/s, at a given layout.

It starts tp*pp*dp local gloo processes, builds the model (a preset or a config's model
section) and the distributed optimizer at that layout, and times `save_checkpoint` --
every rank writing its safetensors files, the sha256 of each, the metadata, the rename
and ``latest`` -- over `--repeats` saves. A second set of processes, at the same layout
or at the one given with ``--load-tp/--load-pp/--load-dp`` (a resharding load), times
what a resume does: each rank verifying the sha256 of its share, then `load_model` and
`load_optimizer` on every rank. GB/s is the checkpoint's bytes on disk (model +
optimizer + RNG files) over the wall time of the slowest rank.

The load reads files that were just written, so they usually come from the operating
system's page cache: the figures then measure trident's own cost, not the disk. Drop
the caches between the phases (or use --dir on another disk) for cold reads.

With ``--resume-scale`` it instead compares resume verification and optimizer loading
before and after issue 19 (``--worlds 1,2,4``: that many local ranks, dp only, zero 1):
per rank, the files and bytes hashed (before: rank 0 alone, everything; after: each rank
its share) and the files opened by a load (before: every optimizer file and every model
header; after: what the index picks), with the slowest rank's seconds. A second table
extrapolates those counts to 70B-class layouts of 1,024-4,096 ranks from the model's
parameter count (``--sim-config``) and this machine's sha256 rate.

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
    parser.add_argument("--resume-scale", action="store_true",
                        help="compare resume verification / optimizer-load cost per rank before and after (see above)")
    parser.add_argument("--worlds", default="1,2,4", help="--resume-scale: local world sizes to run (dp only)")
    parser.add_argument("--sim-config", default=str(Path(__file__).parents[1] / "configs" / "llama-70b.yaml"),
                        help="--resume-scale: the config whose size the simulated large layouts use")
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
    if args.resume_scale:
        return run_resume_scale(args)
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
        result = _measure_resume(layout, config) if phase == "resume" else _measure(layout, phase, config)
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
    from trident.checkpoint import resume

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
            timed("verify", lambda: resume.choose_checkpoint(root, topo, model, opt, log=lambda s: None))
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
        ("", "", "verify sha256 (shares)", ld["seconds"]["verify"], total),
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



# --- --resume-scale: before vs after issue 19 ---------------------------------------------------
def run_resume_scale(args: argparse.Namespace) -> int:
    """Save at each world of --worlds, then measure the old and the new resume per rank."""
    import torch.multiprocessing as mp

    from trident.errors import UserError

    try:
        worlds = [int(w) for w in args.worlds.split(",")]
    except ValueError:
        raise UserError(f"--worlds must be comma-separated integers, got {args.worlds!r}") from None
    config = {"model": model_config(args), "dtype": args.dtype, "zero": 1}
    work = Path(tempfile.mkdtemp(prefix="trident-bench-resume-", dir=args.dir))
    try:
        rows = []
        for world in worlds:
            store = Path(tempfile.mkdtemp(prefix="store-", dir=work))
            config["root"] = str(work / f"ckpt{world}")
            mp.start_processes(_rank_main, args=(world, (1, 1, world), "resume", config, str(store)), nprocs=world,
                               start_method="spawn")
            rows.append(json.loads((store / "result.json").read_text()))
        print(format_resume(rows, config))
        print()
        print(format_simulated(args.sim_config, _sha_rate()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _measure_resume(layout: tuple[int, int, int], config: dict) -> dict:
    """Per-rank figures of the old resume (rank 0 verifies every file; every rank opens
    every optimizer file and model header) and the new (`choose_checkpoint`, index loads)."""
    import torch
    import torch.distributed as dist

    from trident.checkpoint import checkpoint as ckpt
    from trident.checkpoint import resume
    from trident.checkpoint.index import optimizer_files
    from trident.parallel.zero.optimizer_state import local_entries

    root = Path(config["root"])
    topo, model, opt, rng = _build(layout, config, init=True)
    dist.barrier()
    t = time.perf_counter()
    path = ckpt.save_checkpoint(root, 1, topo, model, opt, rng, ckpt.RunState(), keep=0)
    save_s = _slowest(time.perf_counter() - t)
    files = ckpt.read_state(path).files
    sizes = {n: (path / n).stat().st_size for n in files}
    dist.barrier()
    t = time.perf_counter()
    if topo.rank == 0:
        ckpt.verify(path)
    old_verify_s = _slowest(time.perf_counter() - t)
    wanted = [m for m, _, _ in local_entries(opt)]
    old_opens = len(optimizer_files(path, None, wanted, topo.rank)) + len(list(path.glob("model_pp*")))
    hashed: list[str] = []
    real_sha, real_open = resume.sha256_file, ckpt.safe_open
    resume.sha256_file = lambda p: (hashed.append(Path(p).name), real_sha(p))[1]
    opened: list[str] = []
    ckpt.safe_open = lambda p, **kw: (opened.append(Path(p).name), real_open(p, **kw))[1]
    try:
        dist.barrier()
        t = time.perf_counter()
        resume.choose_checkpoint(root, topo, model, opt, log=lambda s: None)
        new_verify_s = _slowest(time.perf_counter() - t)
        ckpt.load_model(path, model)
        ckpt.load_optimizer(path, opt)
    finally:
        resume.sha256_file, ckpt.safe_open = real_sha, real_open
    per_rank = torch.tensor([old_opens, len(set(opened)), len(hashed), sum(sizes[n] for n in hashed)],
                            dtype=torch.float64)
    dist.all_reduce(per_rank, op=dist.ReduceOp.MAX)
    return {"world": topo.world, "files": len(files), "bytes": sum(sizes.values()), "save_s": save_s,
            "old_verify_s": old_verify_s, "new_verify_s": new_verify_s, "old_opens": int(per_rank[0]),
            "new_opens": int(per_rank[1]), "new_hashed_files": int(per_rank[2]), "new_hashed_bytes": int(per_rank[3])}


def format_resume(rows: list[dict], config: dict) -> str:
    from trident.model.config import ModelConfig

    cfg = ModelConfig(**config["model"])
    head = ("world", "files", "MB", "save s", "hashed/rank before", "after", "verify s before", "after",
            "opened/rank before", "after")
    lines = [f"trident bench checkpoint --resume-scale: {cfg.num_parameters() / 1e6:.1f} M parameters, "
             f"{config['dtype']}, zero 1, dp = world (gloo, CPU processes); per rank = the busiest rank; "
             "before = rank 0 hashes every file, a load opens every optimizer file and model header",
             "", "  ".join(f"{h:>{max(len(h), 7)}}" for h in head)]
    for r in rows:
        cells = (r["world"], r["files"], f"{r['bytes'] / 1e6:.1f}", f"{r['save_s']:.2f}",
                 f"{r['files']} f {r['bytes'] / 1e6:.1f} MB", f"{r['new_hashed_files']} f {r['new_hashed_bytes'] / 1e6:.1f} MB",
                 f"{r['old_verify_s']:.2f}", f"{r['new_verify_s']:.2f}", r["old_opens"], r["new_opens"])
        lines.append("  ".join(f"{c:>{max(len(h), 7)}}" for c, h in zip(cells, head)))
    return "\n".join(lines)


def _sha_rate() -> float:
    """This machine's sha256 throughput on one core, bytes/s."""
    import hashlib

    data = b"\0" * (64 << 20)
    t = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    return len(data) / (time.perf_counter() - t)


def format_simulated(config_path: str, rate: float) -> str:
    """The same counts at 70B-class layouts from the parameter count (bf16 weights, fp32 master
    + two moments, zero 1; after: a rank's own optimizer file, model file share and index)."""
    from trident.training.config import load_config

    n = load_config(config_path, []).model.num_parameters()
    model_b, optim_b = 2 * n, 12 * n
    head = ("tp x pp x dp", "world", "hashed/rank before", "after", "verify min before", "after",
            "opened/rank before", "after", "opens in job before", "after")
    lines = [f"simulated at {config_path} ({n / 1e9:.1f} B parameters; model {model_b / 1e9:.0f} GB, optimizer "
             f"{optim_b / 1e9:.0f} GB), sha256 at {rate / 1e9:.2f} GB/s per rank (measured here), same-layout resume:",
             "  ".join(f"{h:>{max(len(h), 7)}}" for h in head)]
    for tp, pp, dp in ((8, 8, 16), (8, 4, 32), (8, 8, 64)):
        world = tp * pp * dp
        after = model_b / (tp * pp) / dp + optim_b / world
        before_opens, after_opens = world + tp * pp, 3
        cells = (f"{tp} x {pp} x {dp}", world, f"{(model_b + optim_b) / 1e9:.0f} GB", f"{after / 1e9:.2f} GB",
                 f"{(model_b + optim_b) / rate / 60:.1f}", f"{after / rate / 60:.2f}", before_opens, after_opens,
                 f"{before_opens * world:.2e}", f"{after_opens * world:.2e}")
        lines.append("  ".join(f"{c:>{max(len(h), 7)}}" for c, h in zip(cells, head)))
    return "\n".join(lines)
