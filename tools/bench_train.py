"""`trident bench train`: tokens/s, TFLOP/s and MFU of a training step, next to plain PyTorch.

It builds the model and optimizer exactly as `trident train` does (`training.build`) at
the layout asked for, feeds synthetic token batches of the config's shape (no data
pipeline, so only the step is timed: pipeline schedule, tensor/data-parallel
communication, clipping, AdamW, ZeRO all-gathers), and reports the median step over the
timed steps. Then the same global batch goes through a plain single-process PyTorch model
of the same architecture (`model.reference`: separate projections, dense head,
`torch.optim.AdamW`, autocast for bf16/fp16), and -- when `transformers` imports -- through
Hugging Face's `LlamaForCausalLM` or `GPT2LMHeadModel` of the same config (SDPA attention,
`torch.optim.AdamW`; `tools.bench_train_hf`), and the throughput ratios are printed.

At (1, 1, 1) the models' steps are interleaved (one trident step, one reference step, one
transformers step, ...), so a noisy shared machine slows all alike and the ratios are
measured side by side. With several ranks, the ranks run first and the reference and
transformers run afterwards in the launching process.

TFLOP/s counts model FLOPs per device (`training.metrics.flops_per_token`: 6N plus
attention, no recomputation); MFU divides by the device's declared peak, or by a measured
matmul rate on a CPU, never below the fastest row's rate; the peak's source is printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="step time, tokens/s, TFLOP/s and MFU at a layout, and the ratio to plain PyTorch",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None, help="YAML config (configs/...); defaults apply when omitted")
    p.add_argument("--tp", type=int, default=None)
    p.add_argument("--pp", type=int, default=None)
    p.add_argument("--dp", type=int, default=None)
    p.add_argument("--cp", type=int, default=None)
    p.add_argument("--nproc", type=int, default=None, help="start this many local ranks (outside torchrun)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--no-reference", action="store_true", help="skip the plain PyTorch reference")
    p.add_argument("--no-transformers", action="store_true", help="skip the Hugging Face transformers row")
    p.add_argument("--report", default=None, help=argparse.SUPPRESS)  # rank 0 -> launcher hand-off
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from trident.errors import UserError
    from trident.tools.launch import launch_local, under_launcher
    from trident.tools.train import overrides_from_args
    from trident.training.config import derive, load_config

    if args.steps < 1 or args.warmup < 0:
        raise UserError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    cfg = load_config(args.config, overrides_from_args(args))
    if cfg.train.compile and args.warmup < 1:
        raise UserError(f"--warmup must be >= 1 with train.compile=true (the first step compiles), got {args.warmup}")
    if under_launcher():
        _rank_main(cfg, args)
        return 0
    world = args.nproc or 1
    derive(cfg, world)
    if world == 1:
        trident, reference, hf = _measure_single(cfg, args)
        _print(cfg, world, trident, reference, hf, args)
        return 0
    with tempfile.TemporaryDirectory(prefix="trident-bench-train-") as tmp:
        report = Path(tmp) / "rank0.json"
        argv = [a for a in args.argv if not a.startswith("--report")] + [f"--report={report}"]
        if launch_local(world, argv) != 0:
            return 1
        trident = json.loads(report.read_text())
    device = torch.device("cuda" if cfg.train.device == "cuda" else "cpu")
    reference = _reference_step(cfg, device, args)
    reference = reference and _measure_alone(cfg, args, reference, device)
    hf = _hf_step(cfg, device, args)
    _print(cfg, world, trident, reference, hf and _measure_alone(cfg, args, hf, device), args)
    return 0


# --- the trident step -------------------------------------------------------------------
class _TridentStep:
    """One training step of this rank on synthetic tokens, built as `trident train` builds it."""

    def __init__(self, cfg, topo) -> None:
        import torch

        from trident.parallel.pipeline.p2p import activation_shape
        from trident.parallel.random import RNGStreams
        from trident.training.build import build_model, build_optimizer, build_schedule
        from trident.training.config import derive

        self.cfg, self.topo = cfg, topo
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg, topo, RNGStreams(cfg.train.seed, topo))
        self.optimizer = build_optimizer(cfg, self.model, topo)
        self.schedule = build_schedule(cfg)
        derived = derive(cfg, topo.world)
        t, s = cfg.train, cfg.data.seq_len
        self.act_shape = activation_shape(t.micro_batch_size, s, cfg.model.hidden, topo.tp, cfg.parallel.sequence_parallel)
        self.micros = synthetic_batch(cfg, derived.microbatches, seed=t.seed + topo.dp_rank)
        self.divisor = float(t.global_batch_size * s)

    def __call__(self) -> float:
        from trident.parallel.pipeline.executor import run_pipeline

        opt = self.optimizer
        opt.zero_grad()
        opt.set_lr(self.schedule.current)
        result = run_pipeline(
            self.model, self.topo, self.micros, act_shape=self.act_shape, loss_divisor=self.divisor,
            schedule=self.cfg.parallel.pp_schedule, vpp=self.cfg.parallel.vpp, grad_sync=opt.grad_sync, before_backward=opt.before_backward,
            loss_scale=opt.loss_scale,
        )
        if opt.step().stepped:
            self.schedule.advance()
        return result.loss


def synthetic_batch(cfg, microbatches: int, seed: int) -> list[dict]:
    """`microbatches` batches of uniformly random tokens, labels the next token."""
    import torch

    g = torch.Generator().manual_seed(seed)
    b, s, v = cfg.train.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    out = []
    for _ in range(microbatches):
        seq = torch.randint(0, v, (b, s + 1), generator=g)
        out.append({"tokens": seq[:, :-1].contiguous(), "labels": seq[:, 1:].contiguous()})
    return out


# --- the plain contenders -----------------------------------------------------------------
class PlainStep:
    """One single-process step of a plain torch model on the bench's global batch:
    `torch.optim.AdamW` with the run's settings, autocast for bf16/fp16, norm clipping.
    Subclasses give the model and the loss of one microbatch."""

    def __init__(self, cfg, device, model) -> None:
        import torch

        self.cfg, self.device, self.model = cfg, device, model
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
        )
        n = cfg.train.global_batch_size // cfg.train.micro_batch_size
        self.micros = [{k: v.to(device) for k, v in mb.items()} for mb in synthetic_batch(cfg, n, cfg.train.seed)]
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.dtype)

    def loss(self, mb: dict):
        raise NotImplementedError

    def __call__(self) -> float:
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for mb in self.micros:
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                loss = self.loss(mb) / len(self.micros)
            loss.backward()
            total += loss.detach()
        if self.cfg.optim.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        self.optimizer.step()
        return float(total)


class _ReferenceStep(PlainStep):
    """The same global batch through `model.reference.ReferenceGPT` and torch's AdamW."""

    def __init__(self, cfg, device) -> None:
        import torch

        from trident.model.reference import ReferenceGPT

        torch.manual_seed(cfg.train.seed)
        super().__init__(cfg, device, ReferenceGPT(cfg.model).to(device))

    def loss(self, mb: dict):
        return self.model(mb["tokens"], mb["labels"])


# --- timing -----------------------------------------------------------------------------
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, device) -> float:
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def _figures(cfg, times: list[float], world: int, peak: tuple[float, str], name: str = "") -> dict:
    """Median step figures; "mfu" is filled in by `_share_peak` once all rows are in."""
    from trident.training.metrics import flops_per_token

    dt = statistics.median(times)
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    tflops = flops_per_token(cfg.model, cfg.data.seq_len) * tokens / dt / world / 1e12
    return {"name": name, "step_s": dt, "tokens_per_s": tokens / dt, "tflops": tflops,
            "peak_tflops": peak[0], "peak_source": peak[1], "steps": len(times)}


def _share_peak(rows: list[dict]) -> None:
    """One peak for all rows (raised to the fastest row's rate when it is measured), and mfu."""
    from trident.training.metrics import model_flops_utilization

    peak, source = max((r["peak_tflops"], r["peak_source"]) for r in rows)
    for r in rows:
        _, peak, source = model_flops_utilization(r["tflops"], peak, source)
    for r in rows:
        r["mfu"], r["peak_tflops"], r["peak_source"] = model_flops_utilization(r["tflops"], peak, source)


def _reference_step(cfg, device, args):
    """The plain reference step, or None (with the reason printed) when skipped."""
    from trident.errors import UserError
    from trident.model.reference import check_supported

    if args.no_reference:
        return None
    try:
        check_supported(cfg.model)
    except UserError as err:  # e.g. ALiBi or a mixture of experts: the other rows still run
        print(f"reference row skipped: {err}", flush=True)
        return None
    return _ReferenceStep(cfg, device)


def _hf_step(cfg, device, args):
    """The transformers step, or None (with the reason printed) when skipped."""
    from trident.tools.bench_train_hf import hf_step

    if args.no_transformers:
        return None
    step, why = hf_step(cfg, device)
    if why:
        print(why, flush=True)
    return step


def _measure_single(cfg, args) -> tuple[dict, dict | None, dict | None]:
    """All steps in this process, interleaved: trident, reference, transformers, trident, ..."""
    from trident.training.compile_clock import compile_seconds
    from trident.training.metrics import device_peak_tflops
    from trident.training.trainer import make_topology

    topo = make_topology(cfg)
    peak = device_peak_tflops(topo.device, cfg.train.dtype, cfg.log.peak_tflops)
    steps = {"trident": _TridentStep(cfg, topo)}
    if (reference := _reference_step(cfg, topo.device, args)) is not None:
        steps["reference"] = reference
    hf = _hf_step(cfg, topo.device, args)
    if hf is not None:
        steps[hf.name] = hf
    compiled = compile_seconds()
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    compiled = compile_seconds() - compiled
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            times[name].append(_timed(step, topo.device))
    rows = {name: _figures(cfg, t, 1, peak, name) for name, t in times.items()}
    rows["trident"]["compile_s"] = compiled
    return rows["trident"], rows.get("reference"), (rows[hf.name] if hf is not None else None)


def _rank_main(cfg, args) -> None:
    """One rank of a multi-rank benchmark; rank 0 writes the figures for the launcher."""
    import torch.distributed as dist

    from trident.training.compile_clock import compile_seconds
    from trident.training.metrics import device_peak_tflops
    from trident.training.trainer import make_topology

    topo = make_topology(cfg)
    try:
        peak = device_peak_tflops(topo.device, cfg.train.dtype, cfg.log.peak_tflops)
        mine = _TridentStep(cfg, topo)
        compiled = compile_seconds()
        for _ in range(args.warmup):
            mine()
        compiled = compile_seconds() - compiled
        times = []
        for _ in range(args.steps):
            dist.barrier()
            times.append(_timed(mine, topo.device))
        if topo.rank == 0 and args.report:
            Path(args.report).write_text(json.dumps({**_figures(cfg, times, topo.world, peak), "compile_s": compiled}))
    finally:
        dist.destroy_process_group()


def _measure_alone(cfg, args, step, device) -> dict:
    """A single-process row (reference or transformers) after the ranks have finished."""
    from trident.training.metrics import device_peak_tflops

    for _ in range(args.warmup):
        step()
    times = [_timed(step, device) for _ in range(args.steps)]
    peak = device_peak_tflops(device, cfg.train.dtype, cfg.log.peak_tflops)
    return _figures(cfg, times, 1, peak, getattr(step, "name", "reference"))


def _print(cfg, world: int, mine: dict, ref: dict | None, hf: dict | None, args) -> None:
    import torch

    from trident.training.config import derive

    p, t = cfg.parallel, cfg.train
    dp = derive(cfg, world).dp
    device = torch.cuda.get_device_name() if t.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"trident bench train: {args.config or 'default config'}, {cfg.model.num_parameters() / 1e6:.2f}M parameters, "
          f"{t.dtype}, {device}")
    print(f"  layout tp={p.tp} pp={p.pp} dp={dp} (world {world}), zero {cfg.optim.zero}, recompute "
          f"{getattr(t, 'recompute', 'none')}, compile {t.compile}; global batch {t.global_batch_size} x "
          f"{cfg.data.seq_len} tokens, micro batch {t.micro_batch_size}; median of {mine['steps']} steps "
          f"after {args.warmup} warm-up")
    rows = [("trident", mine)] + ([("plain PyTorch reference (1 proc)", ref)] if ref else [])
    rows += [(f"{hf['name']} (1 proc)", hf)] if hf else []
    _share_peak([r for _, r in rows])
    print(f"  {'':<40}{'step s':>9}{'tokens/s':>12}{'TFLOP/s/dev':>13}{'MFU':>8}")
    for name, r in rows:
        print(f"  {name:<40}{r['step_s']:>9.4f}{r['tokens_per_s']:>12.0f}{r['tflops']:>13.4f}{r['mfu']:>8.1%}")
    print(f"  peak {mine['peak_tflops']:.3f} TFLOP/s per device ({mine['peak_source']})")
    if t.compile:
        print(f"  torch.compile: {mine.get('compile_s', 0.0):.1f} s compiling (rank 0) in the warm-up steps, "
              f"excluded from the timed ones")
    ratios = [f"trident / reference throughput: {_ratio(mine, ref):.2f}x"] if ref else []
    ratios += [f"trident / transformers throughput: {_ratio(mine, hf):.2f}x"] if hf else []
    if ratios:
        print("  " + "; ".join(ratios))
    sys.stdout.flush()


def _ratio(a: dict, b: dict) -> float:
    """Of the printed (rounded) tokens/s, so the ratio is the quotient a reader computes."""
    return round(a["tokens_per_s"]) / round(b["tokens_per_s"])
