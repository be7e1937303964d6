"""Helpers for "same step at every layout" checks: reference runs, relative errors, and a
gather to full tensors that first proves every replica of a slice holds the same values."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from trident.model.config import ModelConfig, preset
from trident.model.gpt import GPT
from trident.parallel.collectives import all_reduce, group_device
from trident.parallel.tensor.sharding import gather_full, global_shapes, iter_pieces
from trident.parallel.topology import Topology, group_size

# The four architectures the foundation promises, all tiny, all dividing by tp 1, 2, 4.
VARIANTS: dict[str, ModelConfig] = {
    "gqa-rope-rmsnorm-swiglu-untied": preset("tiny", n_heads=8, n_kv_heads=2),
    "mha-learned-layernorm-gelu-tied": preset(
        "tiny", n_kv_heads=None, position="learned", norm="layernorm", activation="gelu", bias=True, tie_embeddings=True
    ),
    "alibi-postnorm-qknorm": preset("tiny", n_kv_heads=4, position="alibi", norm_position="post", qk_norm=True, bias=True),
    "mqa-rope-qknorm-tied": preset("tiny", n_kv_heads=1, qk_norm=True, tie_embeddings=True, vocab_pad_multiple=8),
}


def batch(cfg: ModelConfig, seed: int = 1, b: int = 2, s: int = 16, packed: bool = False) -> dict[str, torch.Tensor]:
    """Token ids, next-token labels and (packed) document ids, the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=gen)
    out = {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}
    if packed:
        # three documents in row 0, two in row 1 (boundaries at uneven places)
        doc = torch.zeros(b, s, dtype=torch.long)
        doc[0, 5:], doc[0, 11:] = 1, 2
        doc[1, 9:] = 1
        out["doc_ids"] = doc
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-4) -> float:
    """||a - b|| / max(||b||, floor), the measure every equivalence test bounds.

    The floor matters only for tensors that are analytically zero but hold float noise,
    such as the gradient of a key bias (softmax ignores a shift shared by all keys).
    """
    a, b = a.double(), b.double()
    return (a - b).norm().item() / max(b.norm().item(), floor)


@torch.no_grad()
def check_replicas_agree(
    module: nn.Module,
    group: dist.ProcessGroup | None,
    grads: bool = False,
    names: dict[str, tuple[int, ...]] | None = None,
) -> None:
    """Raise unless every element written by more than one rank of `group` (or by more than
    one piece on this rank) has exactly the same value in every writer.

    `gather_full` averages the writers of an element (tp-replicated norms, replicated kv
    heads, dp replicas, tied copies across pipeline stages), so replicas that disagree would
    be hidden inside a mean that may still land close to the reference. Here each element's
    maximum and minimum over its writers are reduced with MAX / MIN, and must be equal
    wherever more than one rank wrote. Collective over `group`: every rank must call it.
    """
    shapes = names if names is not None else global_shapes(module)
    order = sorted(shapes)
    offsets, total = {}, 0
    for name in order:
        offsets[name] = total
        total += torch.Size(shapes[name]).numel()
    hi = torch.full((total,), float("-inf"))
    lo = torch.full((total,), float("inf"))
    count = torch.zeros(total)
    views = {}  # global name -> its (max, min, writers) views into the flat buffers
    for name in order:
        size = torch.Size(shapes[name]).numel()
        views[name] = tuple(t[offsets[name] : offsets[name] + size].view(shapes[name]) for t in (hi, lo, count))
    for _, param, gname, piece in iter_pieces(module):
        src = param.grad if grads else param
        if src is None:
            continue
        value = src.detach().float().cpu().narrow(piece.dim, piece.local_start, piece.length)
        h, l, c = (v.narrow(piece.dim, piece.start, piece.length) for v in views[gname])
        torch.maximum(h, value, out=h)
        torch.minimum(l, value, out=l)
        c.add_(1.0)
    if group_size(group) > 1:
        device = group_device(group)
        for t, op in ((hi, dist.ReduceOp.MAX), (lo, dist.ReduceOp.MIN), (count, dist.ReduceOp.SUM)):
            t.copy_(all_reduce(t.to(device), group, op=op).cpu())
    what = "gradient" if grads else "value"
    for name in order:
        h, l, c = views[name]
        shared = c > 1
        differ = shared & ~(h == l)
        if differ.any():
            worst = (h - l)[differ].abs().max().item()
            raise AssertionError(
                f"replicas of {name} disagree before averaging: {int(differ.sum())} of {int(shared.sum())} "
                f"replicated {what} elements differ between writers (largest spread {worst:.3e})"
            )


def gather_checked(
    module: nn.Module,
    group: dist.ProcessGroup | None,
    grads: bool = False,
    names: dict[str, tuple[int, ...]] | None = None,
) -> dict[str, torch.Tensor]:
    """`gather_full`, after `check_replicas_agree`: the mean it takes of replicated slices
    is then the common value of every replica, not a blend of ones that disagree."""
    check_replicas_agree(module, group, grads=grads, names=names)
    return gather_full(module, group, grads=grads, names=names)


def reference_step(cfg: ModelConfig, data: dict, seed: int = 0, label_smoothing: float = 0.0) -> dict:
    """One forward/backward of the single-process model: logits, loss, full gradients."""
    model = GPT(cfg, Topology.single())
    model.init_weights(seed)
    logits = model(data["tokens"], doc_ids=data.get("doc_ids"))
    loss = model(data["tokens"], labels=data["labels"], doc_ids=data.get("doc_ids"), label_smoothing=label_smoothing)
    loss = loss.mean()
    loss.backward()
    return {
        "logits": model.full_logits(logits).detach(),
        "loss": loss.detach(),
        "grads": gather_checked(model, None, grads=True),
    }


def with_overrides(cfg: ModelConfig, **kw: object) -> ModelConfig:
    return dataclasses.replace(cfg, **kw)
