"""Ring attention equals SDPA on the whole sequence: the output and dq, dk, dv.

On 4 gloo ranks, cp=4 (one ring) and cp=2 (two rings of 2, each on its own inputs), for
MHA / GQA / MQA, with and without packed documents (boundaries inside chunks, on chunk
edges and a document spanning ranks, plus a row holding a single document), with and
without ALiBi. Each rank's output and gradient slices are gathered back to full positions
and compared with a float64 single-process reference. Also: cp=1 in one process, the
skip plan as pure arithmetic, and a count proving the ring skips invisible pairs.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from trident.errors import UserError
from trident.parallel.context.ring_attention import PAIR_COUNTS, ring_attention
from trident.parallel.context.ring_blocks import Pair, visible_pairs
from trident.parallel.context.sharding import load_balanced_index

TOL = 1e-5
B, S, D = 2, 32, 8
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}
CASES = [f"{h}{'-docs' if docs else ''}{'-alibi' if alibi else ''}"
         for h, docs, alibi in itertools.product(HEADS, (False, True), (False, True))]


def _doc_ids() -> torch.Tensor:
    """Row 0: six documents, boundaries at 3, 8, 19, 20, 27 (inside chunks and on a chunk
    edge for cp 2 and 4; [8, 19) spans three chunks on two ranks); row 1: one document."""
    lengths, ids = [3, 5, 11, 1, 7, 5], [5, 1, 8, 3, 6, 2]  # equal ids contiguous, not sorted
    row0 = torch.cat([torch.full((n,), i) for n, i in zip(lengths, ids)])
    return torch.stack([row0, torch.full((S,), 4)])  # [b, s]


def _inputs(case: str, seed: int) -> dict:
    """Full-sequence fp32 inputs, the same on every rank that uses `seed`."""
    hq, hk = HEADS[case.split("-")[0]]
    g = torch.Generator().manual_seed(seed)
    t = {n: torch.randn(B, h, S, D, generator=g) for n, h in (("q", hq), ("k", hk), ("v", hk), ("dout", hq))}
    t["doc_ids"] = _doc_ids() if "docs" in case else None
    t["alibi"] = torch.rand(hq, generator=g) if "alibi" in case else None
    return t


def _reference(t: dict) -> dict:
    """SDPA on the whole sequence in float64, with the equivalent explicit mask and bias."""
    q, k, v = (t[n].double().requires_grad_() for n in "qkv")
    pos = torch.arange(S)
    allowed = (pos.unsqueeze(0) <= pos.unsqueeze(1)).expand(B, S, S)  # [b, s, s]
    if t["doc_ids"] is not None:
        allowed = allowed & (t["doc_ids"].unsqueeze(2) == t["doc_ids"].unsqueeze(1))
    bias = torch.zeros(B, 1, S, S, dtype=torch.float64)
    if t["alibi"] is not None:
        bias = -t["alibi"].double().view(1, -1, 1, 1) * (pos.unsqueeze(1) - pos.unsqueeze(0)).double()
    mask = bias.masked_fill(~allowed.unsqueeze(1), float("-inf"))  # [b, 1 or hq, s, s]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    out.backward(t["dout"].double())
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _ring_local(t: dict, group, index: torch.Tensor, rank: int) -> dict:
    """This rank's output and gradients from ring attention on its shard of `t`."""
    mine = index[rank]
    q, k, v = (t[n][:, :, mine].clone().requires_grad_() for n in "qkv")
    out = ring_attention(q, k, v, group, index, doc_ids=t["doc_ids"], alibi=t["alibi"])
    out.backward(t["dout"][:, :, mine])
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _gather_full(local: torch.Tensor, group, index: torch.Tensor) -> torch.Tensor:
    """Every rank's slice of a ``[b, h, s/cp, d]`` tensor put back at its global positions."""
    import torch.distributed as dist

    parts = [torch.empty_like(local) for _ in range(index.shape[0])]
    dist.all_gather(parts, local.contiguous(), group=group)
    full = local.new_empty(*local.shape[:2], S, local.shape[-1])  # [b, h, s, d]
    for i, part in enumerate(parts):
        full[:, :, index[i]] = part
    return full


def _check_cp(cp: int) -> dict:
    """Every case at `cp` on 4 ranks: {case: {tensor: relative error}} and the pair counts."""
    import torch.distributed as dist

    rank = dist.get_rank()
    groups = [dist.new_group(list(range(i, i + cp))) for i in range(0, 4, cp)]  # same order on every rank
    group = groups[rank // cp]
    index = load_balanced_index(S, cp)
    errors, counts = {}, {}
    for case in CASES:
        t = _inputs(case, seed=1 + rank // cp)  # the two cp=2 rings get different inputs
        ref = _reference(t)
        PAIR_COUNTS.clear()
        local = _ring_local(t, group, index, dist.get_rank(group))
        counts[case] = dict(PAIR_COUNTS)
        errors[case] = {n: rel_err(_gather_full(local[n], group, index), ref[n]) for n in ref}
    return {"errors": errors, "counts": counts}


@pytest.mark.parametrize("cp", [2, 4])
def test_ring_matches_sdpa(dist_pool, cp):
    results = dist_pool.run(4, "test_ring_attention:_check_cp", timeout=120, cp=cp)
    for rank, res in enumerate(results):
        assert set(res["errors"]) == set(CASES)
        for case, errs in res["errors"].items():
            for name, err in errs.items():
                assert err <= TOL, f"cp={cp} rank {rank} {case}: {name} relative error {err:.2e}"
        # skipping depends on positions only, so documents and ALiBi do not change the work;
        # load balancing gives every rank the same: 3 pairs on the diagonal, 2 per other block
        for case, counts in res["counts"].items():
            assert counts == {"forward": 3 + 2 * (cp - 1), "backward": 3 + 2 * (cp - 1)}, f"cp={cp} {case}: {counts}"


def test_single_process_matches_sdpa():
    """Group None is cp=1: plain attention in one process, still by the half-split plan."""
    for case in CASES:
        t = _inputs(case, seed=0)
        ref = _reference(t)
        PAIR_COUNTS.clear()
        got = _ring_local(t, None, load_balanced_index(S, 1), 0)
        for name in ref:
            assert rel_err(got[name], ref[name]) <= TOL, f"{case}: {name} {rel_err(got[name], ref[name]):.2e}"
        assert PAIR_COUNTS == {"forward": 3, "backward": 3}  # the later half's keys are hidden from the earlier


def test_low_precision_returns_input_dtype():
    t = _inputs("gqa-docs", seed=3)
    mine = torch.arange(S).unsqueeze(0)
    q, k, v = (t[n].bfloat16().requires_grad_() for n in "qkv")
    out = ring_attention(q, k, v, None, mine, doc_ids=t["doc_ids"])
    out.backward(t["dout"].bfloat16())
    assert out.dtype == q.grad.dtype == k.grad.dtype == v.grad.dtype == torch.bfloat16
    ref = _reference(t)
    assert rel_err(out, ref["out"]) < 2e-2 and rel_err(k.grad, ref["dk"]) < 5e-2


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_plan_skips_what_causality_hides(cp):
    """The plan for the block from rank j at rank r, from positions alone (no processes)."""
    index = load_balanced_index(16 * cp, cp).tolist()
    first, second = slice(0, 8), slice(8, 16)
    for r, j in itertools.product(range(cp), repeat=2):
        got = visible_pairs(index[r], index[j])
        if j == r:  # the diagonal: both halves causal within, the late q half sees the early k half
            want = [Pair(first, first, True), Pair(second, first, False), Pair(second, second, True)]
        elif j < r:  # only k's early chunk (chunk j) is visible, to all queries
            want = [Pair(first, first, False), Pair(second, first, False)]
        else:  # only q's late half sees anything, and sees both of k's chunks
            want = [Pair(second, first, False), Pair(second, second, False)]
        assert got == want, f"cp={cp} r={r} j={j}: {got}"


def test_rejects_inconsistent_inputs():
    q, kv = torch.zeros(1, 4, 8, 8), torch.zeros(1, 3, 8, 8)
    with pytest.raises(UserError, match="multiple of kv heads"):
        ring_attention(q, kv, kv, None, torch.arange(8).unsqueeze(0))
    kv = torch.zeros(1, 2, 8, 8)
    with pytest.raises(UserError, match="index must be"):
        ring_attention(q, kv, kv, None, torch.arange(16).view(2, 8))
    with pytest.raises(UserError, match="doc_ids must cover"):
        ring_attention(q, kv, kv, None, torch.arange(8).unsqueeze(0), doc_ids=torch.zeros(1, 4))
