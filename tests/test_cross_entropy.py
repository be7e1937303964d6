"""The vocabulary-parallel cross-entropy on real 2- and 4-rank splits, against torch.

Every rank builds the same full logits ``[b, s, padded]`` (same seed) and keeps only its
vocabulary shard, as the model's head leaves them: the last real columns are followed by
padding columns, and with a large pad multiple whole shards are padding. The padding
logits are set far above every real logit, so a padding column that was not treated as
-inf would win the max and the partition function. Each rank computes the loss and its
gradient with respect to its own logits, under a non-uniform upstream gradient, with and
without label smoothing, and compares with ``F.cross_entropy`` on the full unpadded logits
in one process: the loss on every rank, the gradient of every real column, and exactly
zero gradient on every padding column.
"""

from __future__ import annotations

import pytest

TOL = 1e-6
B, S = 3, 7
SMOOTHING = (0.0, 0.1)


def _split(vocab: int, padded: int) -> dict:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from equivalence import rel_err
    from trident.parallel.tensor.cross_entropy import vocab_parallel_cross_entropy

    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    shard = padded // world
    start = rank * shard
    real = max(0, min(vocab - start, shard))  # this rank's real columns; the rest are padding

    gen = torch.Generator().manual_seed(11)
    full = 3.0 * torch.randn(B, S, padded, generator=gen)
    full[..., vocab:] = 100.0 + torch.rand(B, S, padded - vocab, generator=gen)  # padding holds the largest logits
    target = torch.randint(0, vocab, (B, S), generator=gen)
    target[0, :4] = torch.tensor([0, vocab - 1, min(shard - 1, vocab - 1), min(shard, vocab - 1)])  # shard edges and both ends
    weight = torch.rand(B, S, generator=gen) + 0.5  # a non-uniform upstream gradient

    out: dict = {"rank": rank, "real": real, "pad": shard - real, "cases": []}
    for eps in SMOOTHING:
        local = full[..., start : start + shard].clone().requires_grad_(True)
        loss = vocab_parallel_cross_entropy(local, target, start, vocab, group, label_smoothing=eps)
        (loss * weight).sum().backward()

        unpadded = full[..., :vocab].clone().requires_grad_(True)
        ref = F.cross_entropy(unpadded.reshape(-1, vocab), target.reshape(-1), reduction="none", label_smoothing=eps)
        ref = ref.view(B, S)
        (ref * weight).sum().backward()

        every = [torch.empty_like(loss) for _ in range(world)]
        dist.all_gather(every, loss.detach())
        # the one-rank shortcut on the whole padded row drops the padding columns too
        single = vocab_parallel_cross_entropy(full, target, 0, vocab, None, label_smoothing=eps)
        out["cases"].append(
            {
                "eps": eps,
                "shape": list(loss.shape),
                "loss_err": rel_err(loss.detach(), ref.detach()),
                "same_on_every_rank": all(torch.equal(e, every[0]) for e in every),
                "grad_err": rel_err(local.grad[..., :real], unpadded.grad[..., start : start + real]) if real else None,
                "padding_grad_zero": torch.equal(local.grad[..., real:], torch.zeros_like(local.grad[..., real:])),
                "grad_dtype": str(local.grad.dtype),
                "single_rank_err": rel_err(single, ref.detach()),
            }
        )
    return out


@pytest.mark.parametrize(
    "world, vocab, padded, pads",
    [
        (2, 50, 64, [0, 14]),  # the last shard: 18 real columns, then 14 padding
        (4, 50, 64, [0, 0, 0, 14]),  # the last shard: 2 real columns, then 14 padding
        (4, 101, 512, [27, 128, 128, 128]),  # tiny preset at tp=4: three shards are all padding
    ],
)
def test_vocab_parallel_loss_and_gradient_match_torch(dist_pool, world, vocab, padded, pads):
    results = dist_pool.run(world, "test_cross_entropy:_split", vocab=vocab, padded=padded)
    assert [r["rank"] for r in results] == list(range(world))
    assert [r["pad"] for r in results] == pads
    assert sum(r["real"] for r in results) == vocab
    for r in results:
        assert [c["eps"] for c in r["cases"]] == list(SMOOTHING)
        for c in r["cases"]:
            where = f"rank {r['rank']} of {world}, label_smoothing={c['eps']}"
            assert c["shape"] == [B, S], where
            assert c["loss_err"] < TOL, f"{where}: loss differs from torch, relative error {c['loss_err']:.2e}"
            assert c["same_on_every_rank"], f"{where}: ranks return different losses"
            if r["real"]:
                assert c["grad_err"] < TOL, f"{where}: gradient differs from torch, relative error {c['grad_err']:.2e}"
            assert c["padding_grad_zero"], f"{where}: a padding column received gradient"
            assert c["grad_dtype"] == "torch.float32", where
            assert c["single_rank_err"] < TOL, f"{where}: the one-rank path let padding in"


def _padding_is_largest() -> dict:
    """Two real columns, padding everywhere else at logit 0 > every real logit."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from trident.parallel.tensor.cross_entropy import vocab_parallel_cross_entropy

    rank, world = dist.get_rank(), dist.get_world_size()
    full = torch.zeros(1, 2 * world)
    full[0, :2] = torch.tensor([-5.0, -6.0])  # columns 2.. are padding with logit 0
    target = torch.tensor([0])
    local = full[:, 2 * rank : 2 * rank + 2].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(local, target, 2 * rank, 2, dist.group.WORLD)
    loss.sum().backward()
    ref_logits = full[:, :2].clone().requires_grad_(True)
    ref = F.cross_entropy(ref_logits, target, reduction="none")
    ref.sum().backward()
    return {
        "loss": loss.item(),
        "ref": ref.item(),
        "grad": local.grad[0].tolist(),
        "ref_grad": ref_logits.grad[0, 2 * rank : 2 * rank + 2].tolist() if rank == 0 else [0.0, 0.0],
    }


@pytest.mark.parametrize("world", [2, 4])
def test_padding_never_wins_even_when_its_logit_is_largest(dist_pool, world):
    results = dist_pool.run(world, "test_cross_entropy:_padding_is_largest")
    for rank, r in enumerate(results):
        # -log softmax([-5, -6])[0] = log(1 + e^-1); padding at logit 0 would make it about 5
        assert r["loss"] == pytest.approx(r["ref"], rel=1e-6) and r["ref"] == pytest.approx(0.31326169, rel=1e-6)
        assert r["grad"] == pytest.approx(r["ref_grad"], abs=1e-7), rank
        if rank > 0:
            assert r["grad"] == [0.0, 0.0]  # a shard of padding only gets exactly no gradient
