"""Ring attention: causal attention over a sequence split across the cp ranks of a group.

Each rank holds ``s / cp`` tokens in the load-balanced layout (`sharding`): its queries
stay put while every rank's K/V block travels once around the ring (rank ``r`` sends to
``r + 1`` and receives from ``r - 1``), and the partial attentions are merged with the
online-softmax rule (out, lse). Only the ``hk`` kv heads travel, never the repeated
query heads. The transfer of the next block is posted before the current block is
computed and waited on after, so communication hides behind compute; two buffers
alternate so the one being received into is never the one being read or sent.

The backward runs the ring again: the K/V block circulates with its fp32 dK/dV
accumulator, each rank adding what its queries contribute, and a final hop returns the
finished gradients to the block's owner. The forward keeps only q, k, v, out and the
log-sum-exp; score matrices are recomputed per (query half, key half) pair, and pairs
that causality hides entirely are skipped in both passes (`ring_blocks.visible_pairs`).

No dropout: the caller must refuse attention dropout when cp > 1 (a dropout mask would
have to be reproduced per pair and per rank; nothing here draws one).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trident.errors import UserError
from trident.parallel.context.ring_blocks import (
    Pair,
    merge,
    pair_backward,
    pair_forward,
    pair_mask,
    pair_scores,
    visible_pairs,
)
from trident.parallel.topology import group_rank, group_size

# (query half, key half) pairs computed by this process, keyed "forward" / "backward";
# tests clear and read it to prove that invisible pairs are skipped.
PAIR_COUNTS: Counter[str] = Counter()
# What the ring's transfers cost this process: "sent_bytes", and "wait_s", the seconds spent
# waiting for a transfer after the block's compute was done (the part not hidden behind it;
# host time, so on CUDA only what the host waits). `trident bench cp` reads and clears it.
RING_STATS: Counter[str] = Counter()

_TAG_KV, _TAG_DKV = 1, 2  # distinct tags keep a K/V block and a dK/dV block from ever matching


@dataclass
class _Ring:
    """What every step of both passes needs: the neighbours and where every token lies."""

    group: dist.ProcessGroup | None
    cp: int
    rank: int
    send_to: int  # global rank of group rank r + 1
    recv_from: int  # global rank of group rank r - 1
    index: list[list[int]]  # [cp][sl] global positions, on the host (plans cost no sync)
    pos: torch.Tensor  # [cp, sl] the same on the compute device (masks and ALiBi)
    doc: torch.Tensor | None  # [b, s] document ids on the compute device
    slopes: torch.Tensor | None  # [hk, g] fp32 ALiBi slopes
    scale: float
    hk: int

    def source(self, step: int) -> int:
        """The group rank whose K/V block this rank holds at `step` of the ring."""
        return (self.rank - step) % self.cp

    def step_pairs(self, step: int) -> list[tuple[Pair, torch.Tensor | None, torch.Tensor, torch.Tensor]]:
        """The visible pairs of `step`, each with its mask and query / key positions."""
        src = self.source(step)
        out = []
        for pair in visible_pairs(self.index[self.rank], self.index[src]):
            qp, kp = self.pos[self.rank, pair.q], self.pos[src, pair.k]  # [n], [m]
            doc_q = doc_k = None
            if self.doc is not None:
                doc_q, doc_k = self.doc[:, qp], self.doc[:, kp]  # [b, n], [b, m]
            out.append((pair, pair_mask(qp, kp, pair.causal, doc_q, doc_k), qp, kp))
        return out

    def shift(self, send: torch.Tensor, recv: torch.Tensor, tag: int) -> list[dist.Work]:
        """Post `send` to the next rank and `recv` from the previous one; wait later.
        Every rank posts send then receive, the pairing gloo's batch needs."""
        ops = [
            dist.P2POp(dist.isend, send, self.send_to, self.group, tag),
            dist.P2POp(dist.irecv, recv, self.recv_from, self.group, tag),
        ]
        RING_STATS["sent_bytes"] += send.numel() * send.element_size()
        return dist.batch_isend_irecv(ops)


def _wait(works: list[dist.Work]) -> None:
    """Wait for posted transfers, counting the time it takes in `RING_STATS`."""
    if not works:
        return
    start = time.perf_counter()
    for work in works:
        work.wait()
    RING_STATS["wait_s"] += time.perf_counter() - start


def _make_ring(
    q: torch.Tensor,
    k: torch.Tensor,
    group: dist.ProcessGroup | None,
    index: torch.Tensor,
    doc_ids: torch.Tensor | None,
    alibi: torch.Tensor | None,
    scale: float | None,
) -> _Ring:
    """Validate the inputs once and gather what the steps need; one sentence per mistake."""
    b, hq, sl, d = q.shape
    hk = k.shape[1]
    cp, rank = group_size(group), group_rank(group)
    if hk < 1 or hq % hk != 0:
        raise UserError(f"query heads ({hq}) must be a multiple of kv heads ({hk})")
    if tuple(index.shape) != (cp, sl):
        raise UserError(f"index must be [cp, s/cp] = [{cp}, {sl}] (load_balanced_index), got {tuple(index.shape)}")
    if doc_ids is not None and tuple(doc_ids.shape) != (b, cp * sl):
        raise UserError(f"doc_ids must cover the full sequence, [{b}, {cp * sl}], got {tuple(doc_ids.shape)}")
    if alibi is not None and tuple(alibi.shape) != (hq,):
        raise UserError(f"alibi must hold one slope per query head, [{hq}], got {tuple(alibi.shape)}")
    send_to = recv_from = rank
    if cp > 1:
        send_to = dist.get_global_rank(group, (rank + 1) % cp)
        recv_from = dist.get_global_rank(group, (rank - 1) % cp)
    return _Ring(
        group=group, cp=cp, rank=rank, send_to=send_to, recv_from=recv_from,
        index=index.tolist(),
        pos=index.to(q.device),
        doc=None if doc_ids is None else doc_ids.to(q.device),
        slopes=None if alibi is None else alibi.to(q.device, torch.float32).view(hk, hq // hk),
        scale=1.0 / math.sqrt(d) if scale is None else float(scale),
        hk=hk,
    )


def _grouped(x: torch.Tensor, hk: int) -> torch.Tensor:
    """fp32 view of query-shaped `x` with the query heads grouped under their kv head."""
    # [b, hq, sl, d]  ->  [b, hk, hq/hk, sl, d]
    b, hq, sl, d = x.shape
    return x.float().reshape(b, hk, hq // hk, sl, d)


class _RingAttention(torch.autograd.Function):
    """Exact causal attention over the cp group's whole sequence; see the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, group, index, doc_ids, alibi, scale):  # type: ignore[override]
        # q: [b, hq, sl, d]; k, v: [b, hk, sl, d]; index: [cp, sl]; doc_ids: [b, s]; alibi: [hq]
        #   ->  out [b, hq, sl, d]; saved lse [b, hk, hq/hk, sl] fp32
        ring = _make_ring(q, k, group, index, doc_ids, alibi, scale)
        qf = _grouped(q, ring.hk)  # [b, hk, g, sl, d]
        out = torch.zeros_like(qf)
        lse = torch.full(qf.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        bufs = [torch.stack([k, v])]  # [2 (k, v), b, hk, sl, d] in the input dtype
        if ring.cp > 1:
            bufs.append(torch.empty_like(bufs[0]))
        for step in range(ring.cp):
            cur = bufs[step % 2]
            pending = ring.shift(cur, bufs[(step + 1) % 2], _TAG_KV) if step < ring.cp - 1 else []
            kf, vf = cur[0].float(), cur[1].float()  # [b, hk, sl, d]
            for pair, mask, qp, kp in ring.step_pairs(step):
                s = pair_scores(qf[:, :, :, pair.q], kf[:, :, pair.k], qp, kp, mask, ring.slopes, ring.scale)
                o_b, l_b = pair_forward(s, vf[:, :, pair.k])
                out[:, :, :, pair.q], lse[..., pair.q] = merge(out[:, :, :, pair.q], lse[..., pair.q], o_b, l_b)
                PAIR_COUNTS["forward"] += 1
            _wait(pending)
        result = out.reshape(q.shape).to(q.dtype)
        ctx.save_for_backward(q, k, v, result, lse)
        ctx.ring = ring
        return result

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        # dout: [b, hq, sl, d]  ->  dq [b, hq, sl, d]; dk, dv [b, hk, sl, d]
        q, k, v, out, lse = ctx.saved_tensors
        ring: _Ring = ctx.ring
        qf, do = _grouped(q, ring.hk), _grouped(dout, ring.hk)  # [b, hk, g, sl, d]
        delta = (do * _grouped(out, ring.hk)).sum(-1)  # [b, hk, g, sl] rowsum(dO * O)
        dq = torch.zeros_like(qf)
        bufs = [torch.stack([k, v])]  # [2 (k, v), b, hk, sl, d]
        if ring.cp > 1:
            bufs.append(torch.empty_like(bufs[0]))
        dkv_in: torch.Tensor | None = None  # the block's dK/dV from the ranks it visited before
        dkv_pending: list[dist.Work] = []
        for step in range(ring.cp):
            cur = bufs[step % 2]
            pending = ring.shift(cur, bufs[(step + 1) % 2], _TAG_KV) if step < ring.cp - 1 else []
            dkv = _block_grads(ring, step, qf, cur, do, lse, delta, dq)  # [2, b, hk, sl, d] fp32
            _wait(dkv_pending)
            if dkv_in is not None:
                dkv += dkv_in
            if ring.cp > 1:  # onward with the block; after the last step this hop returns it home
                dkv_in = torch.empty_like(dkv)
                dkv_pending = ring.shift(dkv, dkv_in, _TAG_DKV)
            _wait(pending)
        _wait(dkv_pending)
        dkv = dkv if dkv_in is None else dkv_in
        dq = dq.reshape(q.shape).to(q.dtype)
        return dq, dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None


def _block_grads(
    ring: _Ring,
    step: int,
    qf: torch.Tensor,
    kv: torch.Tensor,
    do: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    dq: torch.Tensor,
) -> torch.Tensor:
    """This rank's contribution to the held block's dK/dV at `step`; adds into `dq`."""
    # qf, do, dq: [b, hk, g, sl, d]; kv: [2, b, hk, sl, d]; lse, delta: [b, hk, g, sl]  ->  [2, b, hk, sl, d]
    kf, vf = kv[0].float(), kv[1].float()
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
    for pair, mask, qp, kp in ring.step_pairs(step):
        qs, ks = pair.q, pair.k
        s = pair_scores(qf[:, :, :, qs], kf[:, :, ks], qp, kp, mask, ring.slopes, ring.scale)
        dq_b, dk_b, dv_b = pair_backward(
            qf[:, :, :, qs], kf[:, :, ks], vf[:, :, ks], do[:, :, :, qs], s, lse[..., qs], delta[..., qs], ring.scale
        )
        dq[:, :, :, qs] += dq_b
        dkv[0][:, :, ks] += dk_b
        dkv[1][:, :, ks] += dv_b
        PAIR_COUNTS["backward"] += 1
    return dkv


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None,
    index: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    alibi: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal (optionally document-masked, optionally ALiBi) attention of this cp rank's
    queries over the whole sequence, equal to SDPA on the gathered sequence.

    q: ``[b, hq, sl, d]`` at global positions ``index[cp_rank]``; k, v: ``[b, hk, sl, d]``
    (``hk`` divides ``hq``; query head ``h`` reads kv head ``h // (hq // hk)``); index:
    ``[cp, sl]`` from `load_balanced_index`, the same on every rank; doc_ids: ``[b, s]``
    for the FULL sequence (a query sees a key iff it is not later and in the same
    document); alibi: ``[hq]`` slopes adding ``-slope * (i - j)``; scale: default
    ``1/sqrt(d)``. Group None or of size 1 is plain single-process attention. Computes in
    fp32, returns ``q.dtype``. No dropout (the caller refuses it with cp > 1).
    """
    # -> [b, hq, sl, d]
    return _RingAttention.apply(q, k, v, group, index, doc_ids, alibi, scale)
