"""Parameter init without full tensors: each shard's values are bitwise the slices of the
whole-tensor init, for every parameter kind at tp 1/2/4, and the scratch stays bounded."""

from __future__ import annotations

import random

import pytest
import torch

from trident.model.config import ModelConfig
from trident.model.gpt import GPT
from trident.parallel.tensor import sharding
from trident.parallel.tensor.sharding import Piece, full_init_value, init_slice, iter_pieces
from trident.parallel.topology import Layout, Topology

# Every parameter kind: vocab-parallel embedding and head with padding rows, learned positions,
# fused QKV with kv heads replicated over tp (2 kv heads at tp 4), SwiGLU column/row linears,
# biases, LayerNorm weights and biases, QK-norm.
CFG = ModelConfig(
    vocab_size=203, n_layers=2, hidden=48, n_heads=4, n_kv_heads=2, ffn_hidden=80, max_seq_len=37,
    position="learned", norm="layernorm", bias=True, qk_norm=True, vocab_pad_multiple=16,
)


def shard(tp: int, rank: int) -> GPT:
    topo = Topology(layout=Layout(tp=tp, pp=1, dp=1), rank=rank, device=torch.device("cpu"))
    return GPT(CFG, topo)


def test_streamed_slices_equal_the_whole_draw():
    rng = random.Random(0)
    for _ in range(150):
        shape = tuple(rng.randint(1, 60) for _ in range(rng.randint(1, 3)))
        dim = rng.randrange(len(shape))
        start = rng.randrange(shape[dim])
        piece = Piece("w", shape, dim, start, rng.randint(1, shape[dim] - start), 0, std=0.3)
        want = full_init_value(7, "layers.0.w", piece).narrow(dim, piece.start, piece.length)
        got = init_slice(7, "layers.0.w", piece, chunk=rng.choice([16, 48, 160, 4096]))
        assert torch.equal(got, want), (shape, dim, piece.start, piece.length)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_every_shard_is_the_slice_of_the_full_init(tp):
    seed, chunk = 11, 64  # a chunk far below most tensors: the streamed path does the work
    kinds = set()
    for rank in range(tp):
        model = shard(tp, rank)
        for param in model.parameters():
            param.data.fill_(float("nan"))  # anything init leaves unwritten would show
        sharding.init_parameters(model, seed, chunk=chunk)
        covered = {name: torch.zeros(p.shape, dtype=torch.bool) for name, p in model.named_parameters()}
        for name, param, gname, piece in iter_pieces(model):
            want = full_init_value(seed, gname, piece).narrow(piece.dim, piece.start, piece.length)
            got = param.detach().narrow(piece.dim, piece.local_start, piece.length)
            assert torch.equal(got, want), (tp, rank, gname)
            covered[name].narrow(piece.dim, piece.local_start, piece.length).fill_(True)
            kinds.add((piece.init, piece.dim, len(piece.global_shape)))
        for name, param in model.named_parameters():  # padding rows: zero
            assert torch.equal(param.detach()[~covered[name]], torch.zeros(int((~covered[name]).sum()))), name
    assert {("normal", 0, 2), ("normal", 1, 2), ("ones", 0, 1), ("zeros", 0, 1)} <= kinds


def test_scratch_is_bounded_by_the_chunk_not_the_tensor():
    chunk = 256
    model = shard(4, 1)
    largest = max(p.numel() * 4 for p in model.parameters())  # a full global tensor is ~tp x a shard
    assert largest > 4 * chunk
    sharding.scratch_peak[0] = 0
    sharding.init_parameters(model, 3, chunk=chunk)
    assert 16 <= sharding.scratch_peak[0] <= chunk
    sharding.scratch_peak[0] = 0
    sharding.init_parameters(model, 3, chunk=1 << 30)  # whole draws: the largest global tensor
    assert sharding.scratch_peak[0] >= largest // 2
