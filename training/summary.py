"""What a run says about itself before its first step: a dozen aligned `key: value` lines.

The whole resolved config (~90 lines of JSON) used to be echoed here, so the facts a user
checks first -- layout, model size, batch, where the data and the run dir are, whether it
resumes -- scrolled away before the first step. The JSON still goes, unchanged, to
RUN_DIR/config.json (other code reads it) and to stdout with `trident train --print-config`;
the summary is printed by rank 0 only, like every other line of the run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trident.parallel.pipeline.schedule import bubble_fraction
from trident.training.run_control import write_resolved_config

if TYPE_CHECKING:  # the trainer calls in here; only its type is needed
    from trident.training.trainer import Trainer

KEY_WIDTH = 18  # wide enough for the longest key ("microbatches/step:")


def derived_record(trainer: Trainer) -> dict[str, Any]:
    """The "derived" part of RUN_DIR/config.json: what follows from the config and the world."""
    d = trainer.derived
    return {
        "world": trainer.topo.world, "dp": d.dp,
        "microbatches_per_step": d.microbatches, "tokens_per_step": d.tokens_per_step,
        "parameters": trainer.cfg.model.num_parameters(), "flops_per_step": trainer.flops_per_step,
        "peak_tflops_per_device": trainer.peak_tflops, "peak_source": trainer.peak_source,
    }


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M': the magnitude at a glance (the exact count is printed beside it)."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.3g} {prefix}{unit}" if unit else f"{n / factor:.3g}{prefix}"
    return f"{n:.3g} {unit}" if unit else f"{n:.3g}"


def _data_lines(trainer: Trainer) -> list[tuple[str, str]]:
    """Where the tokens come from: the prefixes (with blend weights) or the stdlib corpus."""
    d = trainer.cfg.data
    if d.prefix is None:
        data = f"stdlib corpus ({trainer.data.prefixes[0]})"
    elif len(d.prefix) == 1:
        data = d.prefix[0]
    else:
        weights = d.weights if d.weights is not None else [1.0] * len(d.prefix)
        data = ", ".join(f"{w:g} x {p}" for w, p in zip(weights, d.prefix))
    tokenizer = trainer.data.tokenizer_path + (" (trained on the stdlib corpus)" if d.tokenizer is None else "")
    return [("data", data), ("tokenizer", tokenizer)]


def _start_line(trainer: Trainer) -> str:
    if trainer.resumed_from is None:
        return "fresh (no checkpoint in the run dir)"
    return f"resuming at step {trainer.step} from {trainer.resumed_from}"


def summary_lines(trainer: Trainer) -> list[str]:
    """The start-of-run summary, as printed (rank 0's view: 'on this rank' is rank 0's shard)."""
    cfg, topo, d = trainer.cfg, trainer.topo, trainer.derived
    t, p = cfg.train, cfg.parallel
    total = cfg.model.num_parameters()
    local = sum(param.numel() for param in trainer.model.parameters())
    seq = "on" if p.sequence_parallel else "off"
    rows = [
        ("layout", f"tp={topo.tp} {f'cp={topo.cp} ' if topo.cp > 1 else ''}pp={topo.pp} dp={topo.dp} "
                   f"{f'ep={topo.ep} ' if topo.ep > 1 else ''}"
                   f"(world {topo.world}), sequence parallel {seq}"),
        ("parameters", f"{total:,} ({human(total)}) total; {local:,} on this rank "
                       f"(rank {topo.rank}: tp rank {topo.tp_rank}, pp stage {topo.pp_rank})"),
        ("tokens/step", f"{d.tokens_per_step:,} ({t.global_batch_size} sequences x {cfg.data.seq_len} tokens)"),
        ("microbatches/step", f"{d.microbatches} per dp rank, {t.micro_batch_size} sequences each"),
        ("FLOPs/step", f"{trainer.flops_per_step:.3e} ({human(trainer.flops_per_step, 'FLOP')}, forward + backward)"),
        ("dtype", t.dtype),
        ("ZeRO stage", str(cfg.optim.zero)),
        ("recompute", t.recompute),
        ("pipeline schedule", _schedule_line(p, topo.pp, d.microbatches)),
        *_data_lines(trainer),
        ("steps", f"{trainer.step} -> {t.steps}"),
        ("run dir", str(trainer.run_dir)),
        ("start", _start_line(trainer)),
    ]
    header = f"trident train (the whole resolved config: {trainer.run_dir / 'config.json'})"
    return [header] + [f"  {key + ':':<{KEY_WIDTH}} {value}" for key, value in rows]


def announce_run(trainer: Trainer, print_config: bool) -> None:
    """Write RUN_DIR/config.json and print the summary (and, when asked, the whole JSON first).

    Called on rank 0 only: every rank resolves the same config, so one copy is the truth."""
    text = write_resolved_config(trainer.run_dir, trainer.cfg, derived_record(trainer))
    if print_config:
        print("resolved config:\n" + text, flush=True)
    print("\n".join(summary_lines(trainer)), flush=True)


def _schedule_line(p, pp: int, m: int) -> str:
    """The schedule, its virtual stages and the idle share its formula gives (uniform stages)."""
    if pp == 1:
        return f"{p.pp_schedule} (pp=1: plain accumulation)"
    chunks = f", vpp={p.vpp} chunks per rank" if p.vpp > 1 else ""
    return f"{p.pp_schedule}{chunks}; ideal bubble {bubble_fraction(pp, m, p.pp_schedule, p.vpp):.1%} at m={m}"
