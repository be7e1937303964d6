"""Helpers for "same step at every layout" checks: reference runs and relative errors."""

from __future__ import annotations

import dataclasses

import torch

from trident.model.config import ModelConfig, preset
from trident.model.gpt import GPT
from trident.parallel.tensor.sharding import gather_full
from trident.parallel.topology import Topology

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
        "grads": gather_full(model, None, grads=True),
    }


def with_overrides(cfg: ModelConfig, **kw: object) -> ModelConfig:
    return dataclasses.replace(cfg, **kw)
