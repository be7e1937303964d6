"""This rank's pipeline stage of the model: the one place a stage is built.

The pipeline executor (`trident.parallel.pipeline.executor`) runs any module that follows
the stage protocol and never imports the model; the model side of that contract lives
here. A stage is a `GPT` over a contiguous range of layers, with the embedding on the
first stage and the final norm, head and loss on the last; a tied embedding's two copies
are flagged by the model itself when it creates them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from trident.model.config import ModelConfig
from trident.model.gpt import GPT
from trident.parallel.pipeline.stages import stage_layers
from trident.parallel.random import RNGStreams
from trident.parallel.topology import Topology


def build_stage(
    cfg: ModelConfig,
    topo: Topology,
    split: Sequence[int] | None = None,
    sequence_parallel: bool = False,
    rng: RNGStreams | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    recompute: str = "none",
) -> GPT:
    """This rank's stage of the model (uninitialised: call ``init_weights(seed)``).

    `split` is an explicit number of layers per stage; by default layers are balanced.
    `recompute` is the activation recomputation mode (`trident.model.gpt.RECOMPUTE`).
    Bad splits raise the same `UserError` on every rank, before any transfer.
    """
    ranges = stage_layers(cfg.n_layers, topo.pp, split)
    return GPT(
        cfg,
        topo,
        layers=ranges[topo.pp_rank],
        first_stage=topo.is_first_stage,
        last_stage=topo.is_last_stage,
        sequence_parallel=sequence_parallel,
        rng=rng,
        device=device,
        dtype=dtype,
        recompute=recompute,
    )
