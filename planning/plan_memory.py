"""Bytes one rank will hold, from the config alone: the arithmetic behind `trident plan`.

Nothing here allocates a model; the persistent state (parameters, gradients, optimizer) is
`trident.planning.plan_state`'s. Written to agree with the code it predicts:

* **Activations.** What autograd saves for backward, tensor by tensor (counted by
  storage, as `trident.training.memory.ActivationMeter` counts), for one microbatch
  through one layer, and what every chunk of layers adds (embedding, head, shared
  tables). `trident.planning.plan_pipeline` turns that into a rank's peak under its
  pipeline schedule, walking the schedule's own step list.

  Per layer, without recomputation, the saved tensors are: each norm's input (compute
  dtype) and fp32 per-row statistics; the input of every matmul (qkv, attention
  projection, MLP in and out) — under sequence parallelism the qkv's and the MLP's are
  the local sequence shard (re-gathered in backward), and the MLP's second linear keeps
  the first one's output, not the activation's (rebuilt in backward); the attention
  core's q, k, v (after QK-norm and RoPE; grouped-query k, v repeated in bf16/fp16 only),
  output and log-sum-exp on a fused (flash / memory-efficient) kernel, or q, k, v and
  three s x s tensors (probabilities, dropout mask, dropped probabilities) on the unfused
  one; one dropout mask per residual branch. Selective recomputation keeps the qkv
  output instead of the core's tensors; full keeps only the block input. Per microbatch:
  RoPE tables, the additive attention mask (ALiBi only; packed documents need none), the
  embedding's indices, and on the last stage the final norm, the head input (the
  sequence shard under sp) and the cross-entropy's fp32 softmax over this rank's
  vocabulary slice.

  With sequence parallelism, bf16, selective recomputation, no dropout, a SwiGLU MLP of
  width f and kv width h_kv, one layer keeps ``s·b·(2h + 2h + 2h + 2(h + 2 h_kv) + 2h +
  4f) / tp + 4·2·s·b / tp`` bytes: 2 norm inputs, 2 linear-input shards, the attention
  output, qkv, and gate+up (`trident bench memory` prints it next to Megatron's
  ``s·b·h·(18 + 4f/h) / tp``).

  Device matters in two places: CPU dropout keeps its mask in the compute dtype (CUDA a
  bool), and CPU SDPA falls back to the unfused kernel when attention dropout is on.

  Context parallelism (cp > 1) gives a rank s/cp tokens of every sample (`Shapes.s`), so
  every term above that grows with the sequence uses s/cp; the attention core is ring
  attention's (q, k, v, its output and the fp32 log-sum-exp, k and v never repeated), and
  ALiBi needs no mask table. The ring's K/V and dK/dV blocks in flight are not saved
  tensors: `trident.planning.plan_pipeline.ring_buffer_bytes` adds them to the peak.
  Bucket padding and ZeRO's shards span dp·cp (`state_bytes` is given dp·cp).

  MoE blocks (`ModelConfig.is_moe_layer`) keep their MLP's tensors (`moe_bytes`), dense
  blocks a dense MLP's, each priced as what it is when ``model.moe_layer_freq`` mixes them.
  Under expert parallelism (`Shapes.ep`) a rank's experts compute the rows its ep group
  routed to them: planned at their mean under uniform routing (see `moe_bytes`).

Not counted (as the meter does not count them): temporaries that live within one op,
gradients in flight during backward, communication buffers, and the tensors the pipeline
executor and the ring attention hold in transit (`plan_pipeline.pipeline_buffer_bytes`,
`plan_pipeline.ring_buffer_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass

from trident.model.config import ModelConfig
from trident.parallel.tensor.layers import padded_vocab_size

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


# --- activations ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shapes:
    """What one microbatch's activations depend on, on one rank."""

    cfg: ModelConfig
    b: int  # micro batch size
    seq: int  # sequence length (the whole sample)
    tp: int
    sp: bool  # sequence parallelism (and tp > 1)
    dtype: str
    device: str  # "cuda" or "cpu"
    doc_masking: bool  # packed documents (no mask: causal attention per document; ALiBi's mask is per row)
    cp: int = 1  # context parallelism: this rank holds seq/cp tokens of each sample
    ep: int = 1  # expert parallelism: this rank's experts are E/ep of each MoE layer's

    @property
    def e(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def s(self) -> int:
        """Tokens of each sample on this rank: every saved tensor that grows with the
        sequence grows with this (seq/cp under context parallelism, its 2 chunks)."""
        return self.seq // self.cp

    @property
    def sr(self) -> int:
        """Sequence length of the residual stream on this rank (sharded under sp)."""
        return self.s // self.tp if self.sp else self.s

    @property
    def heads(self) -> int:
        return self.cfg.n_heads // self.tp

    @property
    def kv(self) -> int:
        return self.cfg.kv_heads // self.tp if self.cfg.kv_heads % self.tp == 0 else 1

    @property
    def f(self) -> int:
        return self.cfg.ffn // self.tp

    @property
    def fused_attention(self) -> bool:
        """Flash / memory-efficient SDPA (CUDA always; CPU unless attention dropout is on)."""
        return self.device == "cuda" or self.cfg.attention_dropout == 0.0

    @property
    def output_copied(self) -> bool:
        """Is the projection's input a copy of the core's saved output (the unfused kernel,
        mostly ring attention) rather than a view of it (fused SDPA writes it as
        [b, s, heads, hd])? Ring attention lays its output out as q: RoPE on the qkv view
        writes q token-major, which makes the projection's input a view; a q that is
        still a view of qkv (no RoPE), or that a QK-norm made head-major, is copied. A
        rebuilt core then keeps its output once, not twice."""
        if self.cp > 1:
            return self.cfg.position != "rope" or self.cfg.qk_norm
        return not self.fused_attention

    @property
    def dropout_mask(self) -> int:
        """Bytes per element of a saved dropout mask."""
        return 1 if self.device == "cuda" else self.e


def _norm_bytes(x: Shapes, rows: int, dim: int) -> int:
    """A norm's saved tensors (`trident.model.norms`): its input in the compute dtype and
    fp32 per-row statistics."""
    stats = 1 if x.cfg.norm == "rmsnorm" else 2  # rstd | mean, rstd
    return x.e * rows * dim + 4 * rows * stats


def _rewritten(x: Shapes) -> tuple[bool, bool, bool]:
    """Whether q, k, v reach SDPA as new tensors (True) or as views of the qkv output
    (grouped-query k and v go in unrepeated in fp32, where SDPA shares them over the query
    heads, and repeated in bf16/fp16: `trident.model.attention.Attention.core`)."""
    roped = x.cfg.position == "rope" or x.cfg.qk_norm
    repeated = x.kv != x.heads and x.e != 4 and x.cp == 1  # ring attention never repeats them
    return roped, roped or repeated, repeated


def attention_core_bytes(x: Shapes) -> int:
    """Saved by the attention core (QK-norm, RoPE, SDPA) of one layer, beyond
    the qkv output itself (`qkv_view_saved` says whether that is kept too)."""
    c, b, s, hd, a, e = x.cfg, x.b, x.s, x.cfg.head_dim, x.heads, x.e
    total = 0
    if c.qk_norm:
        for rows in (b * a * s, b * x.kv * s):
            total += _norm_bytes(x, rows, hd) - e * rows * hd  # its input is the view of qkv
    q_new, k_new, v_new = _rewritten(x)
    k_heads = x.heads if _rewritten(x)[2] else x.kv
    if x.cp > 1:
        # ring attention (`trident.parallel.context.ring_attention`) keeps q, k, v as given
        # (q, k new when roped or normed, v a view of qkv: only the kv heads, never
        # repeated), its output in the model dtype and the fp32 log-sum-exp; the
        # projection's input is a copy of that output unless it is a view (`output_copied`)
        total += e * b * s * hd * ((a if q_new else 0) + (x.kv if k_new else 0))
        return total + (2 if x.output_copied else 1) * e * b * s * a * hd + 4 * b * a * s
    if x.fused_attention:
        # q, k, v as given (views are counted with qkv), output (also the projection's
        # input), fp32 log-sum-exp
        total += e * b * s * hd * ((a if q_new else 0) + (k_heads if k_new else 0) + (a if v_new else 0))
        total += e * b * s * a * hd + 4 * b * a * s
        if x.doc_masking:  # one SDPA call per document keeps its own output besides their concatenation
            total += e * b * s * a * hd
    else:
        # (CPU's unfused kernel computes in fp32 whatever the dtype) q * scale and k, v as
        # batched-matmul operands (views are copied), probabilities, dropout mask, dropped
        # probabilities; then the output's [b, s, heads*hd] copy in the model dtype
        total += 4 * b * s * hd * (2 * a + k_heads) + 3 * 4 * b * a * s * s + e * b * s * a * hd
    return total


def qkv_view_saved(x: Shapes) -> bool:
    """Does the core keep a view of the qkv output (and so its whole storage)?"""
    if x.cfg.qk_norm or x.cp > 1:
        return True  # the norm keeps its input, the q / k view; ring attention keeps v as a view
    return x.fused_attention and not all(_rewritten(x))


def shared_bytes(x: Shapes, recompute: str) -> int:
    """Per-microbatch tensors every layer shares (one storage each): RoPE tables, the mask."""
    c, b, s = x.cfg, x.b, x.s
    total = 0
    if c.position == "rope":
        total += 2 * 4 * b * s * c.head_dim
    mask = 0
    if c.position == "alibi" and x.cp == 1:  # ring attention adds ALiBi from its slopes, pair by pair
        mask = 4 * (b if x.doc_masking else 1) * x.heads * s * s
    if mask and (x.fused_attention or recompute != "none"):  # kept by a fused kernel or a checkpoint
        total += mask
    return total


def layer_bytes(x: Shapes, recompute: str = "none", moe: bool | None = None) -> dict[str, int]:
    """One layer's saved tensors of one microbatch, by part (shared tables excluded): an
    MoE block's when `moe` (default: whether the model has experts), else a dense one's."""
    c, b, s, sr, h, e, f = x.cfg, x.b, x.s, x.sr, x.cfg.hidden, x.e, x.f
    if recompute == "full":
        return {"block_input": e * b * sr * h}
    parts: dict[str, int] = {}
    parts["norms"] = 2 * _norm_bytes(x, b * sr, h)
    # qkv and MLP inputs (under sp the shard: re-gathered in backward)
    moe = c.moe_experts > 0 if moe is None else moe
    parts["linear_inputs"] = e * b * sr * h + mlp_input_bytes(x, moe)
    qkv = e * b * s * (x.heads + 2 * x.kv) * c.head_dim
    if recompute == "selective":
        parts["qkv"] = qkv
        parts["attention_output"] = e * b * s * x.heads * c.head_dim
    else:
        parts["attention_core"] = attention_core_bytes(x)
        if qkv_view_saved(x):
            parts["qkv"] = qkv
    if moe:
        parts["mlp"] = moe_bytes(x)
    else:
        fc = 2 * f if c.activation == "swiglu" else f
        parts["mlp"] = e * b * s * fc  # the first linear's output; the activation is rebuilt in backward
    if c.dropout > 0:
        parts["dropout_masks"] = 2 * x.dropout_mask * b * sr * h
    return parts


def mlp_input_bytes(x: Shapes, moe: bool) -> int:
    """The MLP's input, when a block keeps it: a dense MLP's first linear does; in an MoE
    block the shared experts' first linear, or in fp32 the router's matmul (in bf16/fp16
    the router keeps its fp32 copy instead, counted in `moe_bytes`, and nothing the input)."""
    kept = not moe or x.e == 4 or x.cfg.moe_shared_experts > 0
    return x.e * x.b * x.sr * x.cfg.hidden if kept else 0


def moe_bytes(x: Shapes) -> int:
    """An MoE block's MLP (`trident.model.moe`) for one microbatch, beyond its input. For the
    T·k routed rows (T = this rank's tokens, the sequence shard under sp): the expert-sorted
    input, gate+up output, SiLU output and second matmul input, the expert output (kept by
    the scatter back) and its scattered copy (kept by the gate weighting). The router's fp32
    logits, probabilities and per-token sums, the gates (raw, normalised), the int64 choices
    and permutation indices, and in bf16/fp16 fp32 copies of the input and the router
    weight, an fp32 [E] vector and the grouped matmul's int32 offsets [E]. A shared
    expert keeps its first linear's output, as a dense MLP.

    Expert parallelism (ep > 1): the rows this rank's E/ep experts compute are the ones
    its ep group routed to them, received by all-to-all; their count varies with the
    routing and is planned as its mean under uniform routing, N = T·k (the group's
    received rows sum to its sent ones). Per row they keep what they keep at ep = 1, the
    expert input being the received rows regrouped by expert (neither the received
    buffer nor the expert-sorted input is saved: the all-to-all and the regroup's
    index_select keep no inputs), plus the regroup's two int64 permutations; the offsets
    cover E/ep experts."""
    c, e, h, f, k, n = x.cfg, x.e, x.cfg.hidden, x.cfg.moe_ffn, x.cfg.moe_top_k, x.cfg.moe_experts
    t = x.b * x.sr
    routed = e * t * k * (3 * h + 4 * f) + (2 * 8 * t * k if x.ep > 1 else 0)
    router = 4 * t * (2 * n + k + 2) + (4 if e == 4 else e) * t * k + 24 * t * k + 4 * n + 4 * (n // x.ep)
    if e != 4:
        router += 4 * t * h + 4 * n * h
    shared = e * x.b * x.s * 2 * (c.moe_shared_experts * f // x.tp)
    return routed + router + shared


def embedding_bytes(x: Shapes) -> int:
    """First stage: token indices and the out-of-slice mask, learned-position indices,
    the embedding dropout mask."""
    c, b, s = x.cfg, x.b, x.s
    total = 8 * b * s + b * s
    if c.position == "learned":
        if x.sp:
            total += 8 * b * x.sr
        else:  # one row shared by the batch; under cp a row of the [cp, s/cp] global index
            total += 8 * (b * s if x.doc_masking else x.seq)
    if c.dropout > 0:
        total += x.dropout_mask * b * x.sr * c.hidden
    return total


def head_bytes(x: Shapes) -> int:
    """Last stage: final norm, head input, and the cross-entropy's fp32 (log-)softmax and
    targets: torch's kernel over the real vocabulary at tp=1, the vocabulary-parallel one
    over this rank's padded slice (with its target mask) otherwise."""
    c, b, s = x.cfg, x.b, x.s
    if x.tp == 1:
        loss = 4 * b * s * c.vocab_size + 8 * b * s + 4
    else:
        vocab = padded_vocab_size(c.vocab_size, c.vocab_pad_multiple, x.tp) // x.tp
        loss = 4 * b * s * vocab + 9 * b * s
    return _norm_bytes(x, b * x.sr, c.hidden) + x.e * b * x.sr * c.hidden + loss
