"""Packed-document attention without a dense mask (`document_segments`, `segment_attention`)
gives the loss and every parameter gradient that the dense additive [b, 1, s, s] mask gave,
at tp=1 without sequence parallelism, under every recomputation mode."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from equivalence import VARIANTS
from trident.model.attention import AttentionInputs, document_segments
from trident.model.gpt import GPT
from trident.parallel.topology import Topology

RTOL = 1e-5
B, S = 6, 32


def _doc_ids(seed: int) -> torch.Tensor:
    """Random packing: several documents per row, a one-document row, documents of length 1
    (first, last and in between), and two equal rows that share one group of the table."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.rand(B, S, generator=gen) < 0.2
    starts[1] = False  # one document
    starts[2, 1], starts[2, 2], starts[2, S - 1] = True, True, True  # length-1 docs
    starts[4] = starts[3]  # identical boundaries
    starts[5, 1:] = True  # every token its own document
    starts[:, 0] = False
    return starts.long().cumsum(1) + 3  # ids need not start at 0


def _dense_mask(doc_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # doc_ids: [b, s] -> additive [b, 1, s, s], as GPT.attention_inputs built it before
    s = doc_ids.shape[1]
    allowed = torch.ones(s, s, dtype=torch.bool).tril() & (doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1))
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf")).unsqueeze(1)


def _loss_and_grads(cfg, recompute: str, doc_ids: torch.Tensor, dense: bool) -> tuple[torch.Tensor, dict]:
    model = GPT(cfg, Topology.single(), recompute=recompute)
    model.init_weights(0)
    model.train()
    if dense:  # the reference: today's dense mask, in place of whatever the model chose
        original = model.attention_inputs

        def with_dense_mask(*args, **kwargs) -> tuple[AttentionInputs, torch.Tensor]:
            att, positions = original(*args, **kwargs)
            return dataclasses.replace(att, mask=_dense_mask(doc_ids, torch.float32)), positions

        model.attention_inputs = with_dense_mask
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, cfg.vocab_size, (B, S + 1), generator=gen)
    loss = model(tokens[:, :-1], labels=tokens[:, 1:], doc_ids=doc_ids).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize(
    "variant", ["gqa-rope-rmsnorm-swiglu-untied", "mha-learned-layernorm-gelu-tied", "mqa-rope-qknorm-tied"]
)
def test_segments_match_the_dense_mask(variant, recompute):
    cfg = VARIANTS[variant]
    for seed in (0, 1):
        doc_ids = _doc_ids(seed)
        loss, grads = _loss_and_grads(cfg, recompute, doc_ids, dense=False)
        ref_loss, ref_grads = _loss_and_grads(cfg, recompute, doc_ids, dense=True)
        torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=0)
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=RTOL, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_one_document_per_row_is_plain_causal():
    cfg = VARIANTS["gqa-rope-rmsnorm-swiglu-untied"]
    model = GPT(cfg, Topology.single())
    doc_ids = torch.tensor([[4] * 8, [0] * 8])
    assert document_segments(doc_ids) is None
    att, _ = model.attention_inputs(2, 8, doc_ids, 0, torch.device("cpu"))
    assert att.mask is None


def test_segment_table_groups_rows_with_equal_boundaries():
    doc_ids = torch.tensor([[0, 0, 1, 1], [5, 5, 6, 6], [2, 2, 2, 2], [0, 1, 1, 2]])
    table = document_segments(doc_ids)
    assert table.device.type == "cpu" and table.dtype == torch.int64
    assert table.tolist() == [[0, 2, 0, 2], [0, 2, 2, 4], [2, 3, 0, 4], [3, 4, 0, 1], [3, 4, 1, 3], [3, 4, 3, 4]]


def test_alibi_and_decoding_keep_the_dense_mask():
    model = GPT(VARIANTS["alibi-postnorm-qknorm"], Topology.single())
    doc_ids = torch.tensor([[0, 0, 1, 1]])
    att, _ = model.attention_inputs(1, 4, doc_ids, 0, torch.device("cpu"))
    assert att.mask.is_floating_point() and att.mask.shape[-2:] == (4, 4)
    rope = GPT(VARIANTS["gqa-rope-rmsnorm-swiglu-untied"], Topology.single())
    att, _ = rope.attention_inputs(1, 2, None, 4, torch.device("cpu"))
    assert att.mask.is_floating_point() and att.mask.shape[-2:] == (2, 6)
