"""The training program: one function that composes every part, run once per rank.

    config -> layout checks -> process groups -> data -> model stage -> optimizer
    loop: global batch -> pipeline step (1F1B, or plain accumulation at pp=1)
          -> dp reduction, clipping, AdamW (ZeRO) -> LR schedule -> metrics
          -> validation / checkpoint / stop signals

Every decision that ends the loop (step count, time budget, SIGTERM/SIGINT, early
stopping, a non-finite loss) is taken on values all ranks agree on -- the global loss,
or a flag all-reduced over the world -- so ranks always stop at the same step and never
leave a peer waiting in a collective.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trident.checkpoint import checkpoint as ckpt
from trident.checkpoint.resume import choose_checkpoint
from trident.errors import UserError
from trident.model.moe import moe_step_end, set_moe_loss_scale
from trident.parallel.collectives import any_rank
from trident.parallel.pipeline.executor import run_pipeline
from trident.parallel.pipeline.p2p import activation_shape
from trident.parallel.pipeline.schedule import bubble_fraction
from trident.parallel.pipeline.timeline import Timeline, gather_events, recorded_step, write_timeline
from trident.parallel.random import RNGStreams
from trident.parallel.zero.clip import NonFiniteGradientError
from trident.parallel.zero.mixed_precision import parse_dtype
from trident.training.build import build_model, build_optimizer, build_schedule
from trident.training.compile_clock import TIMING_KEYS, CompileClock
from trident.training.config import Config, derive
from trident.training.data_setup import build_data
from trident.training.memory import ActivationMeter, memory_record, rank_memory
from trident.training.metrics import (MetricsWriter, device_peak_tflops, flops_per_token, measured_peak_by_rank0,
                                      model_flops_utilization)
from trident.training.microbatches import loss_tokens, prepare_microbatches
from trident.training.run_control import (
    NonFiniteLossError,
    StopSignal,
    TrainSummary,
    launched,
    make_topology,
)
from trident.training.summary import announce_run
from trident.training.watchdog import start_watchdog

DEFAULT_RUN_DIR = Path("runs") / "trident"  # where a run writes when no --run-dir is given


class Trainer:
    """Holds the parts of one rank's run; `train()` is the usual entry point."""

    def __init__(self, cfg: Config, run_dir: str | Path | None = None, print_config: bool = False) -> None:
        self.cfg = cfg
        self.print_config = print_config  # also print the whole resolved config JSON at the start
        self.topo = make_topology(cfg)
        self.derived = derive(cfg, self.topo.world)
        self.run_dir = Path(run_dir) if run_dir is not None else DEFAULT_RUN_DIR
        self.is_logger = self.topo.rank == 0
        t, p = cfg.train, cfg.parallel
        torch.manual_seed(t.seed)
        self.dtype = parse_dtype(t.dtype)
        self.rng = RNGStreams(t.seed, self.topo)
        self.model = build_model(cfg, self.topo, self.rng)
        self.optimizer = build_optimizer(cfg, self.model, self.topo)
        self.schedule = build_schedule(cfg)
        self.act_shape = activation_shape(
            t.micro_batch_size, cfg.data.seq_len, cfg.model.hidden, self.topo.tp, p.sequence_parallel, self.topo.cp
        )
        self.step = 0
        self.activation_peak: tuple[int, str] | None = None  # (bytes, how measured) of the last metered step
        self.data = build_data(cfg, self.topo, consumed_samples=0)
        self.flops_per_step = flops_per_token(cfg.model, cfg.data.seq_len) * self.derived.tokens_per_step
        self.peak_tflops, self.peak_source = self._peak()
        self.best_val: float | None = None
        self.evals_without_improvement = 0
        self.ckpt_root = self.run_dir / "checkpoints"
        self.resumed_from: Path | None = None
        self.saved_step: int | None = None
        self.timeline_due, self.timeline_step = cfg.log.timeline, -1  # -1: chosen at this process's first step
        self.watchdog = start_watchdog(cfg, self.topo)  # after set-up (rank 0's tokenizer training holds the GIL)

    # --- checkpoints ----------------------------------------------------------------------
    @property
    def checkpointing(self) -> bool:
        return self.cfg.checkpoint.interval >= 0

    def save(self) -> Path:
        self.topo.heartbeat.phase("checkpoint save", slow=True)
        state = ckpt.RunState(
            consumed_samples=self.data.train.consumed_samples,
            scheduler=self.schedule.state_dict(),
            loss_scaler=self.optimizer.scaler.state_dict(),
            early_stopping=ckpt.EarlyStopping(self.best_val, self.evals_without_improvement),
            seed=self.cfg.train.seed,
            tokenizer=os.path.abspath(self.data.tokenizer_path),
            config=self.cfg.to_dict(),
        )
        with self.optimizer.full_parameters():  # ZeRO-3: the units gathered while their slices are written
            path = ckpt.save_checkpoint(self.ckpt_root, self.step, self.topo, self.model, self.optimizer, self.rng,
                                        state, keep=self.cfg.checkpoint.keep)
        self.log(f"step {self.step}: checkpoint saved to {path}")
        self.saved_step = self.step
        return path

    def resume(self, required: bool) -> bool:
        """Continue from the newest verified checkpoint of the run dir, if there is one.

        Every rank verifies the checksums of the files it will read (falling back past a
        corrupt checkpoint together, `choose_checkpoint`), so all resume from the same step.
        """
        self.topo.heartbeat.phase("resume from checkpoint", slow=True)
        path = choose_checkpoint(self.ckpt_root, self.topo, self.model, self.optimizer, log=self.log)
        if path is None:
            if required:
                raise UserError(f"--resume was given but {str(self.ckpt_root)!r} holds no complete, verified checkpoint")
            return False
        state = ckpt.read_state(path)
        saved_model = state.config.get("model") or {}
        for key, value in self.cfg.model.to_dict().items():
            if saved_model.get(key) != value:
                raise UserError(
                    f"checkpoint {path.name} was saved with model.{key}={saved_model.get(key)!r}, "
                    f"but this run has model.{key}={value!r}"
                )
        if state.consumed_samples % self.cfg.train.global_batch_size != 0:
            raise UserError(
                f"checkpoint {path.name} consumed {state.consumed_samples} samples, not a multiple of "
                f"train.global_batch_size={self.cfg.train.global_batch_size}"
            )
        with self.optimizer.full_parameters(write_back=True):  # ZeRO-3: load into gathered units
            ckpt.load_model(path, self.model)
        ckpt.load_optimizer(path, self.optimizer)
        lay = state.layout
        cp = lay.world // (lay.tp * lay.pp * lay.dp)  # the format has no cp: it is what the world leaves
        t = self.topo
        same = (lay.tp, cp, lay.pp, lay.dp, lay.ep) == (t.tp, t.cp, t.pp, t.dp, t.ep)
        ckpt.load_rng(path, self.topo, self.rng, same_layout=same)
        self.schedule.load_state_dict(state.scheduler)
        self.optimizer.scaler.load_state_dict(state.loss_scaler)
        self.data.train.load_state_dict({"consumed_samples": state.consumed_samples})
        self.best_val = state.early_stopping.best_val
        self.evals_without_improvement = state.early_stopping.evals_without_improvement
        self.step = state.step
        self.resumed_from = path
        self.saved_step = self.step  # nothing new to save until the next step
        ep = f" ep={lay.ep}" if lay.ep > 1 else ""
        where = "" if same else f" (saved at tp={lay.tp} {f'cp={cp} ' if cp > 1 else ''}pp={lay.pp} dp={lay.dp}{ep}, resharded)"
        self.log(f"resumed from {path} at step {self.step}{where}")
        return True

    # --- set-up helpers -----------------------------------------------------------------
    def _peak(self) -> tuple[float, str]:
        """Peak TFLOP/s of one device for MFU, and where the figure came from."""
        return device_peak_tflops(self.topo.device, self.cfg.train.dtype, self.cfg.log.peak_tflops,
                                  measure=measured_peak_by_rank0)

    def log(self, text: str) -> None:
        if self.is_logger:
            print(text, flush=True)

    def write_resolved_config(self) -> None:
        """RUN_DIR/config.json and the start-of-run summary (`trident.training.summary`)."""
        if self.is_logger:
            announce_run(self, self.print_config)

    # --- one step -----------------------------------------------------------------------
    def train_step(self, micros: list[dict[str, torch.Tensor]], measure: bool = False) -> dict[str, Any]:
        """One optimizer step; `measure` also meters its peak activation memory (for the
        steps that are logged: the meter's hooks cost time on every saved tensor)."""
        cfg, topo, opt = self.cfg, self.topo, self.optimizer
        micros = prepare_microbatches(micros, cfg)
        divisor = loss_tokens(micros, topo)
        opt.zero_grad()
        opt.set_lr(self.schedule.current)
        meter = ActivationMeter(self.model) if measure else None
        timeline = Timeline(topo.pp_rank, topo.rank, topo.device) if self._timeline_now() else None
        set_moe_loss_scale(self.model, opt.loss_scale / (len(micros) * topo.dp))  # MoE balancing loss: global-batch mean
        with meter if meter is not None else contextlib.nullcontext():
            result = run_pipeline(
                self.model, topo, micros, act_shape=self.act_shape, loss_divisor=divisor,
                schedule=cfg.parallel.pp_schedule, vpp=cfg.parallel.vpp, grad_sync=opt.grad_sync,
                before_backward=opt.before_backward,
                label_smoothing=cfg.train.label_smoothing, loss_scale=opt.loss_scale, timeline=timeline,
            )
        if timeline is not None:
            self._write_timeline(timeline)
        self.activation_peak = (meter.peak_bytes, meter.source) if meter is not None else None
        lr = self.schedule.current
        topo.heartbeat.phase("optimizer step")
        try:
            step = opt.step()
        except NonFiniteGradientError:
            raise NonFiniteLossError(
                f"step {self.step + 1}: the loss is {result.loss} and the gradients hold inf/NaN in "
                f"{cfg.train.dtype}; lower optim.lr, or set train.nonfinite=skip to skip such steps"
            ) from None
        if not math.isfinite(result.loss) and step.stepped and cfg.train.nonfinite == "stop":
            raise NonFiniteLossError(f"step {self.step + 1}: the loss is {result.loss}; set train.nonfinite=skip to skip")
        if step.stepped:
            self.schedule.advance()
        moe = moe_step_end(self.model, cfg.model, topo, update_bias=step.stepped)  # {} for a dense model
        return {"loss": result.loss, "lr": lr, "grad_norm": step.grad_norm, "stepped": step.stepped,
                "loss_scale": step.loss_scale, "clip_coef": step.clip_coef, "moe": moe}

    def _timeline_now(self) -> bool:
        """Whether the coming step records the timeline (log.timeline_step; see `recorded_step`).
        Chosen once, from config and the step this process starts at (after any resume),
        so every rank records the same step, logged or not: gathering is collective."""
        if self.timeline_due and self.timeline_step < 0:
            self.timeline_step = recorded_step(self.cfg.log.timeline_step, self.step, self.cfg.train.steps)
        return self.timeline_due and self.timeline_step == self.step + 1

    def _write_timeline(self, timeline: Timeline) -> None:
        """RUN_DIR/timeline.json (chrome://tracing, Perfetto) and timeline.png (a Gantt chart)."""
        self.timeline_due = False
        events = gather_events(timeline)
        if self.is_logger:
            p = self.cfg.parallel
            bubble = functools.partial(bubble_fraction, name=p.pp_schedule, vpp=p.vpp)
            self.log(write_timeline(events, self.run_dir, self.step + 1, bubble, p.pp_schedule, self.topo.tp, self.topo.dp))

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean per-token loss over the first `eval.iters` global batches of the validation split."""
        if self.data.valid is None:
            return None
        self.model.eval()
        self.topo.heartbeat.phase("validation")
        total, tokens = 0.0, 0.0
        self.data.valid.load_state_dict({"consumed_samples": 0})  # the same samples every time, resumed or not
        it = iter(self.data.valid)
        for _ in range(max(1, self.cfg.eval.iters)):
            micros = prepare_microbatches(next(it), self.cfg)
            divisor = loss_tokens(micros, self.topo)
            res = run_pipeline(self.model, self.topo, micros, act_shape=self.act_shape, loss_divisor=divisor,
                               forward_only=True, schedule=self.cfg.parallel.pp_schedule, vpp=self.cfg.parallel.vpp)
            total += res.loss * divisor
            tokens += divisor
        self.model.train()
        return total / tokens

    # --- the loop -----------------------------------------------------------------------
    def fit(self) -> TrainSummary:
        cfg = self.cfg
        self.write_resolved_config()
        metrics = MetricsWriter(self.run_dir, enabled=self.is_logger, tensorboard=cfg.log.tensorboard,
                                start_step=self.step)
        stop = StopSignal()
        stop.install()
        bar = None
        if self.is_logger:
            from tqdm import tqdm

            bar = tqdm(total=cfg.train.steps, initial=self.step, desc="train", unit="step", file=sys.stderr,
                       dynamic_ncols=True, disable=None)
        losses: list[float] = []
        stopped_by, val_loss = "steps", None
        start, clock = time.perf_counter(), CompileClock(cfg.train.compile)
        it = iter(self.data.train)
        self.model.train()
        try:
            while self.step < cfg.train.steps:
                t0 = time.perf_counter()
                self.topo.heartbeat.begin_step(self.step + 1)
                clock.start()
                micros = next(it)
                logged = (self.step + 1) % cfg.log.interval == 0 or self.step + 1 == cfg.train.steps
                out = self.train_step(micros, measure=logged)
                self.step += 1
                self.topo.heartbeat.waiting("after the step (metrics, stop check)")
                dt = time.perf_counter() - t0
                compiled = clock.compiled(dt, self.topo)  # a compile step has no step time (compile_clock)
                if (note := clock.first_report(self.step)) is not None:
                    self.log(note)
                losses.append(out["loss"])
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{out['loss']:.4f}", tok_s="compiling" if compiled else
                                    f"{self.derived.tokens_per_step / dt:,.0f}")
                if self.step % cfg.log.interval == 0 or self.step == cfg.train.steps:
                    record = {k: v for k, v in self._record(out, dt).items() if not (compiled and k in TIMING_KEYS)}
                    metrics.write({**record, **clock.take()})
                if self.step < cfg.train.steps and cfg.checkpoint.interval > 0 and self.step % cfg.checkpoint.interval == 0:
                    self.save()
                if self.step < cfg.train.steps and cfg.eval.interval > 0 and self.step % cfg.eval.interval == 0:
                    val_loss = self._validate(metrics)
                reason = self._stop_reason(stop, start)
                if reason is not None:
                    stopped_by = reason
                    break
        finally:
            stop.restore()
            if bar is not None:
                bar.close()
        if stopped_by not in ("signal", "exit_interval"):
            val_loss = self._validate(metrics)
        if self.checkpointing and self.step > 0 and self.step != self.saved_step:
            self.save()
        metrics.close()
        final = losses[-1] if losses else None
        self.log(
            f"done: {self.step} steps ({stopped_by}), final loss {final if final is None else round(final, 4)}, "
            f"validation loss {val_loss if val_loss is None else round(val_loss, 4)}, "
            f"{time.perf_counter() - start:.1f} s"
        )
        return TrainSummary(steps=self.step, final_loss=final, val_loss=val_loss, stopped_by=stopped_by,
                            run_dir=str(self.run_dir), losses=losses, signal=stop.received)

    def _validate(self, metrics: MetricsWriter) -> float | None:
        val = self.evaluate()
        if val is None:
            return None
        ppl = math.exp(val) if val < 50 else float("inf")
        metrics.write({"step": self.step, "val_loss": val, "val_ppl": ppl})
        self.log(f"step {self.step}: validation loss {val:.4f}, perplexity {ppl:.2f}")
        if self.best_val is None or val < self.best_val:
            self.best_val, self.evals_without_improvement = val, 0
        else:
            self.evals_without_improvement += 1
        return val

    def _stop_reason(self, stop: StopSignal, start: float) -> str | None:
        """Why the loop ends after this step, or None; every input is agreed by all ranks
        (the validation loss is global, the signal and time budget are all-reduced)."""
        cfg, step = self.cfg, self.step
        if step >= cfg.train.steps:
            return None  # the loop ends by its own condition
        patience = cfg.eval.patience
        if cfg.eval.interval > 0 and step % cfg.eval.interval == 0 and patience > 0 \
                and self.evals_without_improvement >= patience:
            return "early_stopping"
        if cfg.train.exit_interval > 0 and step % cfg.train.exit_interval == 0:
            return "exit_interval"
        budget = cfg.train.time_budget_s
        over_budget = budget > 0 and time.perf_counter() - start >= budget
        if any_rank(stop.received is not None or over_budget, self.topo):
            return "signal" if any_rank(stop.received is not None, self.topo) else "time_budget"
        return None

    def _record(self, out: dict[str, Any], dt: float) -> dict[str, Any]:
        topo = self.topo
        achieved = self.flops_per_step / dt / topo.world / 1e12  # model TFLOP/s per device
        mfu, self.peak_tflops, self.peak_source = model_flops_utilization(achieved, self.peak_tflops, self.peak_source)
        mem = self.optimizer.memory()
        record = {
            "step": self.step,
            **{key: out[key] for key in ("loss", "lr", "grad_norm", "clip_coef", "stepped", "loss_scale")},
            "tokens_per_s": self.derived.tokens_per_step / dt,
            "step_time_s": dt,
            "tflops": achieved,
            "mfu": mfu,
            "peak_tflops": self.peak_tflops,
            "peak_source": self.peak_source,
            "consumed_samples": self.data.train.consumed_samples,
            "param_bytes": mem.get("param_bytes"),
            "grad_bytes": mem.get("grad_bytes"),
            "optimizer_bytes": mem.get("optimizer_bytes"),
        }
        if topo.device.type == "cuda":
            record["max_allocated_bytes"] = torch.cuda.max_memory_allocated(topo.device)
        record.update(out.get("moe", {}))
        act_bytes, act_source = self.activation_peak or (0, "none")
        record.update(memory_record(rank_memory(self.model, self.optimizer, act_bytes, act_source), topo))
        return record

    def close(self) -> None:
        self.watchdog.stop()
        if launched() and dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: Config, run_dir: str | Path | None = None, resume: bool = False,
          print_config: bool = False) -> TrainSummary:
    """Run a whole training job on this rank (one process of torchrun, or the only one).

    A run dir that already holds a checkpoint is resumed automatically (so a job restarted
    by torchrun's --max-restarts continues); `resume=True` additionally requires one.
    """
    trainer = Trainer(cfg, run_dir, print_config)
    try:
        trainer.resume(required=resume)
        return trainer.fit()
    except Exception:
        trainer.watchdog.exit_if_reported()  # a peer's stall, already named, explains this error
        raise
    finally:
        trainer.close()
