"""What a step's microbatches need before the pipeline runs them: the keys the config
uses, and the loss-bearing token count the loss is normalised by."""

from __future__ import annotations

import torch

from trident.parallel.collectives import all_reduce, comm_device
from trident.parallel.topology import Topology
from trident.training.config import Config


def loss_tokens(micros: list[dict[str, torch.Tensor]], topo: Topology) -> float:
    """Loss-bearing tokens of the whole global batch (every microbatch of every dp rank).

    Without a loss mask every dp rank holds microbatches of the same shape, so the count is
    known here with no collective (and no host-device synchronisation on a GPU)."""
    if not any("loss_mask" in mb for mb in micros):
        return float(sum(mb["labels"].numel() for mb in micros) * topo.dp)
    local = sum(float(mb["loss_mask"].sum()) if "loss_mask" in mb else float(mb["labels"].numel()) for mb in micros)
    t = torch.tensor([local], dtype=torch.float64, device=comm_device(topo))
    all_reduce(t, topo.dp_group)
    return float(t.item())


def prepare_microbatches(micros: list[dict[str, torch.Tensor]], cfg: Config) -> list[dict[str, torch.Tensor]]:
    """Drop what the step does not need: document ids without document masking, and the
    loss mask when nothing is masked (it is all ones: a multiply and a collective saved)."""
    drop = ({"doc_ids"} if not cfg.data.doc_masking else set()) | ({"loss_mask"} if not cfg.data.mask_eod_loss else set())
    if not drop:
        return micros
    return [{k: v for k, v in mb.items() if k not in drop} for mb in micros]
