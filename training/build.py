"""This rank's model stage and optimizer, built from a training config.

One place for it, so that `trident train`, `trident bench train` and the tests build
exactly the same thing from the same config: a benchmark of a differently assembled
model would measure something users never run.
"""

from __future__ import annotations

import torch

from trident.model.gpt import GPT
from trident.model.stage import build_stage
from trident.parallel.random import RNGStreams
from trident.parallel.topology import Topology
from trident.parallel.zero.mixed_precision import MixedPrecisionConfig, parse_dtype
from trident.parallel.zero.optimizer import DistributedOptimizer
from trident.training.config import Config
from trident.training.lr_schedule import LRSchedule


def build_model(cfg: Config, topo: Topology, rng: RNGStreams) -> GPT:
    """This rank's stage, initialised from `train.seed` (the same weights at every layout).

    With `train.compile` each transformer block's forward goes through torch.compile; the
    block is the unit (not the whole stage) so the pipeline executor and the tensor-parallel
    collectives between blocks stay ordinary Python.
    """
    t, p = cfg.train, cfg.parallel
    model = build_stage(
        cfg.model, topo, split=p.pp_split, sequence_parallel=p.sequence_parallel, rng=rng,
        device=topo.device, dtype=parse_dtype(t.dtype), recompute=getattr(t, "recompute", "none"),
        vpp=p.vpp,
    )
    if topo.device.type != "meta":  # a dry run's shard (trident.planning.dry_run) has no values to fill
        model.init_weights(t.seed)
    if t.compile:
        for block in model.layers.values():
            block.compile()
    return model


def build_optimizer(cfg: Config, model: torch.nn.Module, topo: Topology) -> DistributedOptimizer:
    """AdamW with ZeRO sharding, fp32 masters and (fp16) loss scaling, per the config."""
    o = cfg.optim
    precision = MixedPrecisionConfig(
        dtype=cfg.train.dtype, initial_scale=o.loss_scale, growth_interval=o.loss_scale_window,
        min_scale=o.min_loss_scale,
    )
    on_nonfinite = "skip" if cfg.train.nonfinite == "skip" else "auto"
    return DistributedOptimizer(model, topo, o, precision.validate(), on_nonfinite=on_nonfinite)


def build_schedule(cfg: Config) -> LRSchedule:
    o = cfg.optim
    return LRSchedule(o.lr, o.min_lr, o.warmup_steps, cfg.train.steps, o.schedule, o.decay_fraction)
