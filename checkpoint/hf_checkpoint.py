"""trident checkpoints <-> Hugging Face folders: what `trident export` and `trident import` do.

Export reads the checkpoint's slices back into whole tensors (at whatever layout they
were saved, in one process) and hands them to `trident.checkpoint.hf.export_hf` with the
model config and the tokenizer the run was trained with.

Import writes an ordinary trident checkpoint, ``OUT/step_0000000`` plus ``OUT/latest``,
through the same `save_checkpoint` the trainer uses: the model at tp = pp = dp = 1, a
fresh optimizer state (fp32 master = the imported weights, zero moments) and the RNG
streams, so the trainer resumes from it and `load_model` reshards it at any layout. The
tokenizer files go next to the step folders (``OUT/tokenizer.model`` or
``OUT/tokenizer.json``), where pruning old checkpoints never deletes them, and
meta.json records their path. Its `RunState` is that of a run about to take its first
step, with a run config of just the sections a reader needs: ``model`` (what a resuming
trainer checks its own model against) and ``data`` (the tokenizer and a sequence length).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from trident.checkpoint.checkpoint import save_checkpoint
from trident.checkpoint.hf import export_hf, hf_architecture, import_hf
from trident.checkpoint.hf_files import DEFAULT_MAX_SHARD_BYTES
from trident.checkpoint.offline import find_tokenizer, full_tensors
from trident.checkpoint.state import RunState, read_state
from trident.checkpoint.store import complete_checkpoints, find_checkpoint
from trident.errors import UserError
from trident.model.config import ModelConfig
from trident.model.stage import build_stage
from trident.parallel.random import RNGStreams
from trident.parallel.tensor.sharding import load_full
from trident.parallel.topology import Topology
from trident.parallel.zero.mixed_precision import MixedPrecisionConfig
from trident.parallel.zero.optimizer import DistributedOptimizer, OptimizerConfig


@dataclass
class ExportResult:
    checkpoint: Path
    output: Path
    architecture: str  # llama | gpt2
    tokenizer: Path | None
    files: list[str]


def export_checkpoint(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    with_tokenizer: bool = True,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> ExportResult:
    """Export a trident checkpoint (a step folder, a checkpoints folder or a run folder) as
    a Hugging Face folder. `tokenizer` overrides the one the checkpoint records."""
    path = find_checkpoint(checkpoint)
    state = read_state(path)
    cfg = state.model_config()
    arch = hf_architecture(cfg)  # refuse an unrepresentable model before reading any tensor
    tok: Path | None = None
    if with_tokenizer:
        tok = Path(tokenizer) if tokenizer is not None else find_tokenizer(path, state)
        if tok is None or not tok.exists():
            recorded = tokenizer if tokenizer is not None else state.tokenizer
            raise UserError(
                f"the tokenizer of {str(path)!r} (recorded as {str(recorded)!r}) was not found; "
                "pass --tokenizer PATH, or --no-tokenizer to export the weights alone"
            )
    out = export_hf(cfg, full_tensors(path), output, tokenizer_path=tok, max_shard_bytes=max_shard_bytes,
                    dtype=dtype)
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    return ExportResult(checkpoint=path, output=out, architecture=arch, tokenizer=tok, files=files)


def _copy_tokenizer(hf_dir: Path, out_root: Path) -> Path | None:
    """The HF folder's tokenizer copied into the checkpoints folder, sentencepiece first
    (trident's native format, and the original when the folder was exported by trident)."""
    for name in ("tokenizer.model", "tokenizer.json"):
        src = hf_dir / name
        if src.is_file():
            dst = out_root / name
            shutil.copyfile(src, dst)
            return dst.resolve()
    return None


def import_checkpoint(hf_dir: str | os.PathLike, output: str | os.PathLike, seed: int = 0) -> Path:
    """Convert a HF Llama or GPT-2 folder into the trident checkpoint ``output/step_0000000``.

    `output` plays the part of a run's ``checkpoints`` folder: point `trident generate`
    or `trident export` at it, or name it ``RUN_DIR/checkpoints`` and `trident train
    --run-dir RUN_DIR --resume` (with the same model config) trains on from it.
    """
    hf_path, out_root = Path(hf_dir), Path(output)
    if out_root.exists() and not out_root.is_dir():
        raise UserError(f"--output {str(out_root)!r} is a file; give a folder for the checkpoint")
    if complete_checkpoints(out_root):
        raise UserError(f"--output {str(out_root)!r} already holds checkpoints; give an empty or new folder")
    cfg, tensors = import_hf(hf_path)
    topo = Topology.single()
    model = build_stage(cfg, topo)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # vocabulary padding rows belong to no global tensor: keep them zero
    load_full(model, tensors)
    del tensors
    optimizer = DistributedOptimizer(model, topo, OptimizerConfig(zero=0), MixedPrecisionConfig())
    out_root.mkdir(parents=True, exist_ok=True)
    tok = _copy_tokenizer(hf_path, out_root)
    tokenizer = str(tok) if tok else None
    state = RunState(  # a run about to take its first step: no samples consumed, no schedule steps
        loss_scaler=optimizer.scaler.state_dict(),
        seed=seed,
        tokenizer=tokenizer,
        config={"model": cfg.to_dict(), "data": {"tokenizer": tokenizer, "seq_len": min(256, cfg.max_seq_len)}},
        imported_from=str(hf_path.resolve()),
    )
    return save_checkpoint(out_root, 0, topo, model, optimizer, RNGStreams(seed, topo), state, keep=0)


def describe(cfg: ModelConfig) -> str:
    """One line about a model, for the commands' output."""
    kv = f", {cfg.kv_heads} kv heads" if cfg.kv_heads != cfg.n_heads else ""
    tied = "tied" if cfg.tie_embeddings else "untied"
    return (
        f"{cfg.n_layers} layers x {cfg.hidden} wide, {cfg.n_heads} heads{kv}, vocab {cfg.vocab_size}, {tied}, "
        f"{cfg.num_parameters() / 1e6:.2f} M parameters"
    )
