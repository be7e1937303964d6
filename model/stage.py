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

from trident.errors import UserError
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
    vpp: int = 1,
) -> GPT:
    """This rank's stage of the model (uninitialised: call ``init_weights(seed)``).

    `split` is an explicit number of layers per stage (per virtual stage, pp·vpp entries,
    with `vpp` chunks per rank); by default layers are balanced. With vpp > 1, rank r
    holds virtual stages r, r+pp, ..., r+(vpp-1)·pp (the interleaved schedule's placement).
    `recompute` is the activation recomputation mode (`trident.model.gpt.RECOMPUTE`).
    Bad splits raise the same `UserError` on every rank, before any transfer.
    """
    if vpp > 1 and topo.pp * vpp > cfg.n_layers:
        raise UserError(
            f"pp={topo.pp} x vpp={vpp} = {topo.pp * vpp} virtual stages is more than model.n_layers={cfg.n_layers}; "
            f"every virtual stage needs at least one layer"
        )
    ranges = stage_layers(cfg.n_layers, topo.pp * vpp, split)
    chunks = [ranges[c * topo.pp + topo.pp_rank] for c in range(vpp)]
    return GPT(
        cfg,
        topo,
        layers=chunks[0] if vpp == 1 else None,
        chunks=chunks,
        first_stage=topo.is_first_stage,
        last_stage=topo.is_last_stage,
        sequence_parallel=sequence_parallel,
        rng=rng,
        device=device,
        dtype=dtype,
        recompute=recompute,
    )
