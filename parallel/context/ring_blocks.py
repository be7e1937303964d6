"""The arithmetic of one ring-attention step, without any communication.

A step of the ring pairs this rank's queries with one arriving K/V block. Both hold two
chunks of the load-balanced layout (`sharding.load_balanced_index`), so the step is cut
into (query half, key half) pairs; comparing the halves' smallest and largest global
positions says, before any arithmetic, whether a pair is invisible (skipped), visible
in full (no causal mask) or needs a mask. Everything here is fp32 on the grouped-head
layout ``[b, hk, g, n, d]`` (query head ``h`` is ``(h // g, h % g)``), so a kv head is
never repeated to the query heads: a broadcast matmul shares it across its ``g`` heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Pair:
    """One (query half, key half) sub-block of a ring step that has something visible."""

    q: slice  # rows of this rank's queries
    k: slice  # rows of the arriving block's keys
    causal: bool  # False when every key precedes every query: no causal mask is needed


def halves(n: int) -> list[slice]:
    """The two chunks of a rank's ``n`` tokens (one slice when there is only one token)."""
    h = n // 2
    return [slice(0, h), slice(h, n)] if h > 0 else [slice(0, n)]


def visible_pairs(q_pos: list[int], k_pos: list[int]) -> list[Pair]:
    """The pairs of a step that any query can see, decided from positions alone.

    A key half that starts after the query half ends is wholly in the future: skipped.
    One that ends before the query half starts is wholly in the past: visible without a
    causal mask. Only the rest (the diagonal chunks) builds a mask. Because every rank
    knows every rank's index, this plan costs no communication and no device sync.
    """
    pairs = []
    for qs in halves(len(q_pos)):
        q_lo, q_hi = min(q_pos[qs]), max(q_pos[qs])
        for ks in halves(len(k_pos)):
            k_lo, k_hi = min(k_pos[ks]), max(k_pos[ks])
            if k_lo > q_hi:
                continue
            pairs.append(Pair(qs, ks, causal=k_hi >= q_lo))
    return pairs


def pair_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, doc_q: torch.Tensor | None, doc_k: torch.Tensor | None
) -> torch.Tensor | None:
    """Which keys each query may see in one pair, or None when it sees them all.

    The document mask is the only part that depends on the batch row, so a pair without
    documents gets a mask shared by the whole batch.
    """
    # q_pos: [n], k_pos: [m] global positions; doc_q: [b, n], doc_k: [b, m]  ->  [b or 1, 1, 1, n, m] bool
    mask = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1) if causal else None  # [n, m]
    if doc_q is not None and doc_k is not None:
        same = doc_q.unsqueeze(2) == doc_k.unsqueeze(1)  # [b, n, m]
        mask = same if mask is None else same & mask
    return None if mask is None else mask.reshape(-1, 1, 1, *mask.shape[-2:])


def pair_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    mask: torch.Tensor | None,
    slopes: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Scaled scores plus the ALiBi bias, ``-inf`` where masked, in the order SDPA adds them."""
    # q: [b, hk, g, n, d], k: [b, hk, m, d], slopes: [hk, g]  ->  [b, hk, g, n, m]
    s = torch.einsum("bhgnd,bhmd->bhgnm", q, k) * scale
    if slopes is not None:
        distance = (q_pos.unsqueeze(1) - k_pos.unsqueeze(0)).to(s.dtype)  # [n, m]
        s = s + (-slopes[:, :, None, None]) * distance  # [b, hk, g, n, m]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s


def finite(lse: torch.Tensor) -> torch.Tensor:
    """`lse` with ``-inf`` (a row that sees nothing) replaced by 0, so that
    ``exp(s - lse)`` is ``exp(-inf) = 0`` there instead of ``exp(nan)``."""
    return lse.masked_fill(lse == float("-inf"), 0.0)


def pair_forward(s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair's softmax-normalised output and its log-sum-exp (``-inf`` on a row that
    sees none of these keys; its output is 0)."""
    # s: [b, hk, g, n, m], v: [b, hk, m, d]  ->  out [b, hk, g, n, d], lse [b, hk, g, n]
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - finite(lse).unsqueeze(-1))
    return torch.einsum("bhgnm,bhmd->bhgnd", p, v), lse


def merge(
    out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The online-softmax rule: two partial attentions over disjoint keys combined into
    the attention over their union. Rows unseen by both stay 0 with ``lse = -inf``."""
    # out, out_b: [b, hk, g, n, d]; lse, lse_b: [b, hk, g, n]
    new = torch.logaddexp(lse, lse_b)
    base = finite(new)
    w, w_b = torch.exp(lse - base).unsqueeze(-1), torch.exp(lse_b - base).unsqueeze(-1)
    return out * w + out_b * w_b, new


def pair_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    s: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one pair from the recomputed scores and the forward's final lse.

    With the final lse, ``P = exp(S - lse)`` is this pair's slice of the full softmax, so
    the pairs' gradients simply add up; ``delta = rowsum(dO * O)`` replaces the full row
    of ``P * dP`` that the softmax derivative needs. dK and dV sum over the ``g`` query
    heads sharing a kv head (the einsum contracts ``g``).
    """
    # q, do: [b, hk, g, n, d]; k, v: [b, hk, m, d]; s: [b, hk, g, n, m]; lse, delta: [b, hk, g, n]
    p = torch.exp(s - finite(lse).unsqueeze(-1))  # [b, hk, g, n, m]
    dv = torch.einsum("bhgnm,bhgnd->bhmd", p, do)
    dp = torch.einsum("bhgnd,bhmd->bhgnm", do, v)
    ds = p * (dp - delta.unsqueeze(-1))
    dq = torch.einsum("bhgnm,bhmd->bhgnd", ds, k) * scale
    dk = torch.einsum("bhgnm,bhgnd->bhmd", ds, q) * scale
    return dq, dk, dv
