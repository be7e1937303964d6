"""Attention: positions (RoPE, ALiBi, learned; reset per document), masks, the KV cache
and the tensor-parallel attention layer.

Query heads are split over tp; key/value heads too, or replicated when there are fewer of
them than tp ranks. Everything between the qkv and the output projection is `core`, the
part selective recomputation rebuilds in backward.

Packed documents (``doc_ids``) never build an s x s mask in training. When every row holds
one document, attention is plain ``is_causal=True`` SDPA. Otherwise `document_segments`
turns the doc ids, once per forward, into a small CPU table of contiguous runs, and
`segment_attention` runs causal SDPA (the fused kernel) on each document's slice of q, k
and v: the same result as the dense mask, without its [b, 1, s, s] tensor, and with the
FLOPs of the documents rather than of the whole row. Measured with `trident bench
attention` (Attention.core forward+backward, fp32, 2-core CPU, batch 4, 8 heads, 4 kv
heads, head_dim 32): seq 1024, 4 docs per row: causal 88 ms, dense mask 122 ms (1.37x),
segments 47 ms (0.53x); 32 docs per row: segments 29 ms (0.33x); seq 256: 8.4 / 8.9 /
5.8 ms, and 1.11x causal with 32 docs of ~8 tokens (one SDPA call per document: Python
overhead grows with the number of documents). `torch.nn.attention.flex_attention` was
measured and rejected on CPU: it has no backward there (NotImplementedError in torch
2.13), and building its block mask alone took 900 ms at seq 1024 (b=4). ALiBi and
KV-cache decoding past the first chunk (start_pos > 0) keep the dense additive mask
(`GPT.attention_inputs`).

The segment table travels in `AttentionInputs.mask` (an int64 CPU tensor, told apart from
an additive float mask by its dtype), so recomputation saves and replays it like any
other tensor argument, and reading it in every layer is not a device synchronisation.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trident.errors import UserError
from trident.model.config import ModelConfig
from trident.model.norms import make_norm
from trident.parallel.context.ring_attention import ring_attention
from trident.parallel.context.sharding import load_balanced_index
from trident.parallel.random import TP, RNGStreams
from trident.parallel.recompute import checkpoint
from trident.parallel.tensor.layers import Block, ColumnParallelLinear, RowParallelLinear
from trident.parallel.topology import Topology


# --- positions -----------------------------------------------------------------------------
def rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin, [max_seq_len, head_dim], in the rotate-half layout (as Hugging
    Face Llama), with the sin's first half negated: `apply_rope` then needs no negation."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, half, dtype=torch.float64, device=device) / half))
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    ones = torch.ones(half, dtype=torch.float64, device=device)
    sign = torch.cat([-ones, ones])
    return angles.cos().float(), (angles.sin() * sign).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin``, bit for bit: rotate_half(x) = [-x2, x1] is
    roll(x) = [x2, x1] with the sign moved into the table. One copy forward and one
    backward, where slicing and concatenating cost a negation, two zero-filled full-size
    gradients and an add in backward (measured 1.8x faster, fp32 CPU)."""
    # x: [b, heads, s, head_dim]; cos, signed_sin: [b, 1, s, head_dim]
    rotated = x.roll(x.shape[-1] // 2, dims=-1)  # [x2, x1]
    return (x.float() * cos + rotated.float() * signed_sin).to(x.dtype)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes (Press et al. 2022), including the non-power-of-two rule."""

    def powers(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = powers(closest)
    if closest < n_heads:
        slopes += powers(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token within its own document (resets at every boundary)."""
    # doc_ids: [b, s], non-decreasing along s  ->  [b, s]
    idx = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


def document_segments(doc_ids: torch.Tensor) -> torch.Tensor | None:
    """The contiguous documents of each row as a CPU table, or None when no row has a boundary.

    Rows ``[r0, r1)`` with the same boundaries form one group; the table holds one line
    ``(r0, r1, start, end)`` per document of each group, groups in row order. Given
    ``doc_ids`` on the CPU (as training does) it costs no host-device sync; given them on a
    GPU, one device-to-host copy per forward (the kernel choice depends on them).
    """
    # doc_ids: [b, s], equal ids contiguous along s  ->  [n_segments, 4] int64 (CPU) or None
    ids = doc_ids.detach().to("cpu")
    change = ids[:, 1:] != ids[:, :-1]  # [b, s-1]
    if not bool(change.any()):
        return None  # one document per row: plain causal attention
    s = ids.shape[1]
    lines: list[tuple[int, int, int, int]] = []
    prev: list[int] | None = None
    r0 = 0
    for r in range(ids.shape[0] + 1):
        bounds = [0, *(change[r].nonzero().flatten() + 1).tolist(), s] if r < ids.shape[0] else None
        if bounds != prev:
            if prev is not None:
                lines += [(r0, r, a, e) for a, e in zip(prev[:-1], prev[1:])]
            prev, r0 = bounds, r
    return torch.tensor(lines, dtype=torch.int64)


def segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, p: float, gqa: bool = False
) -> torch.Tensor:
    """Causal SDPA within each document of `document_segments`' table (dropout `p`; `gqa`:
    fewer kv heads than query heads).

    The pieces are taken with `split` (its backward is one concatenation), not by slicing
    (each slice's backward would write a zero-filled full-size gradient).
    """
    # q: [b, heads, s, hd]; k, v: [b, kv heads, s, hd]; table: [n_segments, 4] (CPU)  ->  [b, heads, s, hd]
    groups: dict[tuple[int, int], list[int]] = {}  # rows -> document lengths, in row order
    for r0, r1, a, e in table.tolist():
        groups.setdefault((r0, r1), []).append(e - a)
    rows = [r1 - r0 for r0, r1 in groups]
    outs: list[torch.Tensor] = []
    for qg, kg, vg, lengths in zip(q.split(rows), k.split(rows), v.split(rows), groups.values()):
        parts = zip(qg.split(lengths, dim=2), kg.split(lengths, dim=2), vg.split(lengths, dim=2))
        docs = [
            F.scaled_dot_product_attention(qs, ks, vs, dropout_p=p, is_causal=True, enable_gqa=gqa).transpose(1, 2)
            for qs, ks, vs in parts
        ]  # [rows, length, heads, hd] each
        outs.append(torch.cat(docs, dim=1) if len(docs) > 1 else docs[0])  # [rows, s, heads, hd]
    # concatenated in the [b, s, heads, hd] layout, so the caller's transpose and reshape are free
    return (torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]).transpose(1, 2)


@dataclass
class RingInputs:
    """What ring attention (context parallelism) needs besides q, k and v; it stands in
    `AttentionInputs.mask` under cp > 1, so recomputation replays it like a mask."""

    group: object  # the cp process group
    index: torch.Tensor  # [cp, s/cp] int64: every cp rank's global token positions
    doc_ids: torch.Tensor | None  # [b, s] the whole sequence's documents (None: one per row)
    alibi: torch.Tensor | None  # [heads/tp] ALiBi slopes (distances are global positions)


def ring_inputs(
    topo: Topology, batch: int, seq: int, doc_ids: torch.Tensor | None, device: torch.device,
    rope: tuple[torch.Tensor, torch.Tensor] | None, alibi: torch.Tensor | None,
) -> tuple["AttentionInputs", torch.Tensor]:
    """Context parallelism: this rank holds `seq` = s/cp tokens of every sample, at the
    global positions `load_balanced_index` gives it; `doc_ids` cover the whole sequence.

    Positions (RoPE, learned; reset per document) are the tokens' global ones, so each
    token is rotated as in the single-process model; the ring attention masks every K/V
    block it receives by (document, global position) from the same tables. Returns the
    attention inputs and the positions ``[b, s/cp]``.
    """
    cp = topo.cp
    if doc_ids is not None and doc_ids.shape[1] != seq * cp:
        raise UserError(
            f"under context parallelism doc_ids must cover the whole sequence ({seq} tokens x cp={cp} = "
            f"{seq * cp}), got {doc_ids.shape[1]}"
        )
    index = load_balanced_index(seq * cp, cp)  # [cp, s/cp], on the CPU: the ring reads it as numbers
    mine = index[topo.cp_rank].to(device)  # [s/cp]
    if doc_ids is not None:
        doc_ids = doc_ids.to(device, non_blocking=True)
        positions = document_positions(doc_ids)[:, mine]  # [b, s/cp]
    else:
        positions = mine.unsqueeze(0).expand(batch, seq)
    cos = sin = None
    if rope is not None:
        cos, sin = rope[0][positions].unsqueeze(1), rope[1][positions].unsqueeze(1)  # [b, 1, s/cp, hd]
    ring = RingInputs(topo.cp_group, index, doc_ids, alibi)
    return AttentionInputs(cos=cos, sin=sin, mask=ring), positions


@dataclass
class AttentionInputs:
    """What every layer's attention needs, built once per forward by the model."""

    cos: torch.Tensor | None  # [b, 1, s, head_dim] (RoPE)
    sin: torch.Tensor | None
    # additive float [b or 1, 1 or heads/tp, s, s_kv]; int64 CPU document table
    # [n_segments, 4] (`document_segments`); `RingInputs` under cp > 1; None = causal
    mask: torch.Tensor | RingInputs | None
    start_pos: int = 0  # tokens already in the KV cache


class KVCache:
    """Keys and values of this rank's kv heads for incremental decoding, one pair per layer."""

    def __init__(self, layers: list[int], batch: int, max_len: int, kv_local: int, head_dim: int, device, dtype):
        shape = (batch, kv_local, max_len, head_dim)
        self.k = {i: torch.zeros(shape, device=device, dtype=dtype) for i in layers}
        self.v = {i: torch.zeros(shape, device=device, dtype=dtype) for i in layers}
        self.max_len = max_len
        self.length = 0  # tokens cached so far; the model advances it after each forward

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: [b, kv/tp, s_new, head_dim] -> cached [b, kv/tp, start + s_new, head_dim]
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


# --- attention -----------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head, grouped-query or multi-query attention over this rank's heads.

    Query heads are split over tp. Key/value heads are split too when tp divides them;
    when there are fewer kv heads than tp ranks, each kv head is replicated on the
    tp/kv ranks whose query heads use it, and its gradient is summed over those ranks.
    """

    def __init__(
        self, cfg: ModelConfig, topo: Topology, layer: int, sp: bool, rng: RNGStreams | None, device, dtype,
        recompute_core: bool = False,
    ):
        super().__init__()
        tp, r, hd = topo.tp, topo.tp_rank, cfg.head_dim
        self.layer, self.rng, self.head_dim = layer, rng, hd
        self.recompute_core = recompute_core  # selective recomputation: rebuild the core in backward
        self.heads = cfg.n_heads // tp
        replicas = 1
        if cfg.kv_heads % tp == 0:
            self.kv_heads, kv_start, kv_group = cfg.kv_heads // tp, r * (cfg.kv_heads // tp), None
        else:  # fewer kv heads than ranks: replicate
            replicas = tp // cfg.kv_heads
            self.kv_heads, kv_start, kv_group = 1, r // replicas, topo.tp_block_group(replicas)
        blocks = [
            Block("q", cfg.n_heads * hd, r * self.heads * hd, self.heads * hd),
            Block("k", cfg.kv_heads * hd, kv_start * hd, self.kv_heads * hd, kv_group, replicas),
            Block("v", cfg.kv_heads * hd, kv_start * hd, self.kv_heads * hd, kv_group, replicas),
        ]
        kw = {"device": device, "dtype": dtype}
        self.qkv = ColumnParallelLinear(cfg.hidden, blocks, topo, bias=cfg.bias, sequence_parallel=sp, std=cfg.init_std, **kw)
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.proj = RowParallelLinear(cfg.hidden, cfg.hidden, topo, bias=cfg.bias, sequence_parallel=sp, std=out_std, **kw)
        # QK-norm weights are shared by all heads; each rank sees only its heads' share
        self.q_norm = make_norm(cfg, hd, topo.tp > 1, **kw) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, hd, topo.tp > 1, **kw) if cfg.qk_norm else None
        self.dropout = cfg.attention_dropout

    def forward(self, x: torch.Tensor, att: AttentionInputs, cache: KVCache | None = None) -> torch.Tensor:
        # x: [b, s(/tp), hidden]  ->  [b, s(/tp), hidden]
        qkv = self.qkv(x)  # [b, s, (heads + 2 kv)/tp * head_dim]
        b, s, _ = qkv.shape
        q, k, v = qkv.split([self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], -1)
        q = q.view(b, s, self.heads, self.head_dim).transpose(1, 2)  # [b, heads/tp, s, hd]
        k = k.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)  # [b, kv/tp, s, hd]
        v = v.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.recompute_core and self.training and cache is None:
            # q, k, v are views of one tensor, so only `qkv` (and the shared tables) is kept
            out = checkpoint(self.core, q, k, v, att.cos, att.sin, att.mask, rng=self.rng)
        else:
            out = self.core(q, k, v, att.cos, att.sin, att.mask, cache, att.start_pos)  # [b, s, heads/tp * hd]
        return self.proj(out)

    def core(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        mask: torch.Tensor | RingInputs | None,
        cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        """QK-norm, RoPE, then softmax(QK^T / sqrt(d) + mask) with dropout, times V.

        Everything between the qkv and the output projection: the part that selective
        recomputation rebuilds in backward. It costs few FLOPs (no weight matmul) but
        holds most of a layer's saved tensors (normed and rotated q and k, repeated k and
        v, the attention output and statistics, or the s x s probabilities and dropout
        mask on the unfused path), while its inputs are views of one tensor.
        """
        # q: [b, heads/tp, s, hd]; k, v: [b, kv/tp, s, hd]; cos, sin: [b, 1, s, hd]  ->  [b, s, heads/tp * hd]
        b, _, s, _ = q.shape
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v, start_pos)  # [b, kv/tp, s_kv, hd]
        if isinstance(mask, RingInputs):  # context parallelism: only the kv heads travel the ring
            out = ring_attention(q, k, v, mask.group, mask.index, mask.doc_ids, mask.alibi)  # [b, heads/tp, s/cp, hd]
            return out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
        # grouped-query in fp32: SDPA shares each kv head over its query heads itself (no
        # repeated copy of k and v forward, no sum of their gradients backward). In bf16/fp16
        # the repeat stays: with enable_gqa the CPU kernel's k/v gradients drift further from
        # fp32 (bf16 vs fp32 loss over 20 steps: max gap 3.0% against 2.3% with the repeat).
        gqa = self.kv_heads != self.heads and k.dtype == torch.float32
        if self.kv_heads != self.heads and not gqa:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)  # [b, heads/tp, s_kv, hd]
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        p = self.dropout if self.training else 0.0
        with self.rng.fork(TP) if (p > 0 and self.rng is not None) else nullcontext():
            if mask is not None and not mask.is_floating_point():  # packed documents
                out = segment_attention(q, k, v, mask, p, gqa)  # [b, heads/tp, s, hd]
            else:
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None, enable_gqa=gqa
                )  # [b, heads/tp, s, hd]
        return out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)  # [b, s, heads/tp * hd]
