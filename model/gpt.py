"""A decoder-only transformer written with tensor-parallel layers, top to bottom:
norms, positions, attention, MLP, block, model.

At tp=1 every parallel layer is a plain layer and this reads as a single-device GPT. The
model can also be built as one pipeline stage: a contiguous range of layers, with the
embedding only on the first stage and the final norm, head and loss only on the last.

Activations are batch-first. Shapes use ``s`` for the full sequence and ``s/tp`` where
sequence parallelism shards it; ``heads/tp`` and ``kv/tp`` are this rank's heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trident.errors import UserError
from trident.model.config import ModelConfig
from trident.parallel.tensor.cross_entropy import vocab_parallel_cross_entropy
from trident.parallel.tensor.layers import (
    Block,
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    mark_tp_partial_grad,
)
from trident.parallel.tensor.mappings import gather_from_tp, scatter_to_sp
from trident.parallel.random import REPLICATED, TP, RNGStreams
from trident.parallel.recompute import checkpoint
from trident.parallel.tensor.sharding import Piece, init_parameters, set_pieces
from trident.parallel.topology import Topology


# Activation recomputation in training (`trident.parallel.recompute`): none keeps every
# activation; selective rebuilds each attention core (QK-norm, RoPE, QK^T, softmax,
# dropout, .V) in backward and keeps only the qkv output; full keeps only each block's
# input and rebuilds the whole block. Dropout masks replay exactly (the RNG streams are
# restored for the recomputation), so the step is the same in every mode.
RECOMPUTE = ("none", "selective", "full")


# --- norms ---------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., dim]  ->  same. torch's fused kernel keeps the statistics in fp32 whatever
        # the compute dtype (bitwise what an explicit fp32 upcast gives, in fp32 and bf16)
        # without saving fp32 copies of x for backward, and is ~2x faster on CPU.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, bias: bool, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(dim, device=device, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., dim]
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), bias, self.eps).to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int, partial_grad: bool, device=None, dtype=None) -> nn.Module:
    norm = (
        RMSNorm(dim, cfg.norm_eps, device, dtype)
        if cfg.norm == "rmsnorm"
        else LayerNorm(dim, cfg.norm_eps, cfg.bias, device, dtype)
    )
    if partial_grad:
        for p in norm.parameters():
            mark_tp_partial_grad(p)
    return norm


# --- positions -----------------------------------------------------------------------------
def rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, [max_seq_len, head_dim], in the rotate-half layout (as Hugging Face Llama)."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, half, dtype=torch.float64, device=device) / half))
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [b, heads, s, head_dim]; cos, sin: [b, 1, s, head_dim]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


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


@dataclass
class AttentionInputs:
    """What every layer's attention needs, built once per forward by the model."""

    cos: torch.Tensor | None  # [b, 1, s, head_dim] (RoPE)
    sin: torch.Tensor | None
    mask: torch.Tensor | None  # additive [b or 1, 1 or heads/tp, s, s_kv]; None = causal
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
        mask: torch.Tensor | None,
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
        if self.kv_heads != self.heads:
            group = self.heads // self.kv_heads
            k = k.repeat_interleave(group, dim=1)  # [b, heads/tp, s_kv, hd]
            v = v.repeat_interleave(group, dim=1)
        p = self.dropout if self.training else 0.0
        with self.rng.fork(TP) if (p > 0 and self.rng is not None) else _nullcontext():
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None
            )  # [b, heads/tp, s, hd]
        return out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)  # [b, s, heads/tp * hd]


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# --- MLP -----------------------------------------------------------------------------------
class MLP(nn.Module):
    """SwiGLU (fused gate+up, each rank holding matching slices of both) or GeLU."""

    def __init__(self, cfg: ModelConfig, topo: Topology, sp: bool, device, dtype):
        super().__init__()
        f, tp, r = cfg.ffn, topo.tp, topo.tp_rank
        local = f // tp
        self.swiglu = cfg.activation == "swiglu"
        kw = {"device": device, "dtype": dtype}
        out = [Block("gate", f, r * local, local), Block("up", f, r * local, local)] if self.swiglu else f
        self.fc = ColumnParallelLinear(cfg.hidden, out, topo, bias=cfg.bias, sequence_parallel=sp, std=cfg.init_std, **kw)
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.proj = RowParallelLinear(f, cfg.hidden, topo, bias=cfg.bias, sequence_parallel=sp, std=out_std, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [b, s(/tp), hidden]  ->  [b, s(/tp), hidden]
        h = self.fc(x)  # [b, s, ffn/tp] (x2 for SwiGLU)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.proj(h)


# --- block ---------------------------------------------------------------------------------
class TransformerBlock(nn.Module):
    def __init__(
        self, cfg: ModelConfig, topo: Topology, layer: int, sp: bool, rng: RNGStreams | None, device, dtype,
        recompute: str = "none",
    ):
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.recompute_full = recompute == "full"  # full recomputation: rebuild the whole block
        self.rng = rng
        self.norm1 = make_norm(cfg, cfg.hidden, sp, device, dtype)
        self.attn = Attention(cfg, topo, layer, sp, rng, device, dtype, recompute_core=recompute == "selective")
        self.norm2 = make_norm(cfg, cfg.hidden, sp, device, dtype)
        self.mlp = MLP(cfg, topo, sp, device, dtype)
        self.dropout = _HiddenDropout(cfg.dropout, rng, sp)

    def forward(self, x: torch.Tensor, att: AttentionInputs, cache: KVCache | None = None) -> torch.Tensor:
        # x: [b, s(/tp), hidden]  ->  same
        if self.recompute_full and self.training and cache is None:
            # keep only the block input (and the tables every layer shares); rebuild the rest
            return checkpoint(self._checkpointed, x, att.cos, att.sin, att.mask, rng=self.rng)
        return self._forward(x, att, cache)

    def _checkpointed(
        self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        # every activation is an argument, as `checkpoint` requires (training: no cache, start 0)
        return self._forward(x, AttentionInputs(cos, sin, mask))

    def _forward(self, x: torch.Tensor, att: AttentionInputs, cache: KVCache | None = None) -> torch.Tensor:
        # x: [b, s(/tp), hidden]  ->  same
        if self.pre_norm:
            x = x + self.dropout(self.attn(self.norm1(x), att, cache))
            return x + self.dropout(self.mlp(self.norm2(x)))
        x = self.norm1(x + self.dropout(self.attn(x, att, cache)))
        return self.norm2(x + self.dropout(self.mlp(x)))


class _HiddenDropout(nn.Module):
    """Dropout on the residual stream, drawn from the stream that matches its sharding:
    the same mask on every tp rank for a replicated hidden state, distinct masks for
    sequence shards."""

    def __init__(self, p: float, rng: RNGStreams | None, sp: bool) -> None:
        super().__init__()
        self.p, self.rng, self.stream = p, rng, TP if sp else REPLICATED

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.rng is None:
            return F.dropout(x, self.p, True)
        with self.rng.fork(self.stream):
            return F.dropout(x, self.p, True)


# --- model ---------------------------------------------------------------------------------
class GPT(nn.Module):
    """The transformer, or one pipeline stage of it.

    forward(inputs) takes token ids ``[b, s]`` on the first stage and the previous stage's
    hidden state ``[b, s(/tp), hidden]`` elsewhere. It returns the hidden state on every
    stage but the last, which returns this rank's vocabulary slice of the logits
    ``[b, s, padded_vocab/tp]``, or the per-token loss ``[b, s]`` when `labels` are given.

    `recompute` (none | selective | full, see `RECOMPUTE`) applies in training mode with
    gradients on; evaluation and decoding with a KV cache never recompute.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        topo: Topology,
        layers: range | None = None,
        first_stage: bool = True,
        last_stage: bool = True,
        sequence_parallel: bool = False,
        rng: RNGStreams | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        recompute: str = "none",
    ) -> None:
        super().__init__()
        cfg.check_tp(topo.tp)
        if recompute not in RECOMPUTE:
            raise UserError(f"recompute is {recompute!r}; valid values are {', '.join(RECOMPUTE)}")
        self.recompute = recompute
        self.cfg, self.topo, self.rng = cfg, topo, rng
        self.layer_range = layers if layers is not None else range(cfg.n_layers)
        self.first_stage, self.last_stage = first_stage, last_stage
        self.sp = sequence_parallel and topo.tp > 1
        device = device if device is not None else topo.device
        kw = {"device": device, "dtype": dtype}
        emb_kw = dict(pad_multiple=cfg.vocab_pad_multiple, sequence_parallel=self.sp, std=cfg.init_std, **kw)

        # The tied head on a last stage that is not also the first keeps its own copy of
        # the embedding under the same global name, so it starts equal (the pipeline
        # keeps the two copies equal by summing their gradients).
        if first_stage or (last_stage and cfg.tie_embeddings):
            self.embedding = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden, topo, **emb_kw)
        if first_stage and cfg.position == "learned":
            self.pos_embedding = nn.Parameter(torch.empty(cfg.max_seq_len, cfg.hidden, **kw))
            shape = (cfg.max_seq_len, cfg.hidden)
            piece = Piece("pos_embedding", shape, 0, 0, shape[0], 0, "normal", cfg.init_std, replicas=-1)
            set_pieces(self.pos_embedding, [piece])
            if self.sp:
                mark_tp_partial_grad(self.pos_embedding)
        self.emb_dropout = _HiddenDropout(cfg.dropout, rng, self.sp)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(cfg, topo, i, self.sp, rng, device, dtype, recompute) for i in self.layer_range}
        )
        if last_stage:
            self.final_norm = make_norm(cfg, cfg.hidden, self.sp, **kw)
            if not cfg.tie_embeddings:
                self.head = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden, topo, **emb_kw)
        if cfg.position == "rope":
            cos, sin = rope_tables(cfg, device)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if cfg.position == "alibi":
            heads = cfg.n_heads // topo.tp
            slopes = alibi_slopes(cfg.n_heads)[topo.tp_rank * heads : (topo.tp_rank + 1) * heads]
            self.register_buffer("alibi", slopes.to(device), persistent=False)

    # --- weights ----------------------------------------------------------------------------
    def init_weights(self, seed: int) -> None:
        """Fill parameters from (seed, global name) alone: the same model at every layout."""
        init_parameters(self, seed)

    @property
    def output_layer(self) -> VocabParallelEmbedding:
        return self.embedding if self.cfg.tie_embeddings else self.head

    # --- forward ----------------------------------------------------------------------------
    def attention_inputs(
        self, batch: int, seq: int, doc_ids: torch.Tensor | None, start_pos: int, device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[AttentionInputs, torch.Tensor]:
        """Positions, RoPE tables and the attention mask for a [batch, seq] chunk.

        The mask is additive, in the compute `dtype`: SDPA would otherwise turn a bool mask
        into an additive one inside every layer, and every layer's attention would save
        its own [b, 1, s, s] copy for backward; made once here, they all save this one.
        """
        q_abs = torch.arange(start_pos, start_pos + seq, device=device)
        k_abs = torch.arange(0, start_pos + seq, device=device)
        if doc_ids is not None:
            positions = document_positions(doc_ids)  # [b, s]
        else:
            positions = q_abs.unsqueeze(0).expand(batch, seq)
        mask = None
        if doc_ids is not None or start_pos > 0 or self.cfg.position == "alibi":
            allowed = (k_abs.unsqueeze(0) <= q_abs.unsqueeze(1)).unsqueeze(0)  # [1, s, s_kv]
            if doc_ids is not None:
                allowed = allowed & (doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1))  # [b, s, s]
            mask = allowed.unsqueeze(1)  # [b or 1, 1, s, s_kv]
            if self.cfg.position == "alibi":
                distance = (q_abs.unsqueeze(1) - k_abs.unsqueeze(0)).float()  # [s, s_kv]
                bias = -self.alibi.view(-1, 1, 1) * distance  # [heads/tp, s, s_kv]
                mask = bias.unsqueeze(0).masked_fill(~mask, float("-inf"))  # [b or 1, heads/tp, s, s_kv]
            else:
                mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))
        cos = sin = None
        if self.cfg.position == "rope":
            cos = self.rope_cos[positions].unsqueeze(1)  # [b, 1, s, hd]
            sin = self.rope_sin[positions].unsqueeze(1)
        return AttentionInputs(cos=cos, sin=sin, mask=mask, start_pos=start_pos), positions

    def _check_inputs(self, inputs: torch.Tensor, seq: int, start_pos: int, cache: KVCache | None) -> None:
        limit = self.cfg.max_seq_len
        if start_pos + seq > limit and self.cfg.position in ("learned", "rope"):
            raise UserError(f"sequence of {start_pos + seq} tokens is longer than model.max_seq_len={limit}")
        if cache is not None and start_pos + seq > cache.max_len:
            raise UserError(f"{start_pos + seq} tokens do not fit the KV cache of {cache.max_len}")
        if cache is not None and self.sp:
            raise UserError("a KV cache (incremental decoding) cannot be used with sequence parallelism")
        if self.sp and seq % self.topo.tp != 0:
            raise UserError(f"sequence length {seq} is not divisible by tp={self.topo.tp} (sequence parallelism)")
        if self.first_stage:
            if inputs.dtype not in (torch.int32, torch.int64):
                raise UserError(f"the first stage takes token ids, got a {inputs.dtype} tensor")
            if inputs.numel() and (int(inputs.min()) < 0 or int(inputs.max()) >= self.cfg.vocab_size):
                raise UserError(
                    f"token ids must be in [0, {self.cfg.vocab_size}); got min {int(inputs.min())}, max {int(inputs.max())}"
                )

    def forward(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        label_smoothing: float = 0.0,
    ) -> torch.Tensor:
        # inputs: tokens [b, s] (first stage) or hidden [b, s(/tp), hidden]
        # labels, doc_ids: [b, s]
        b = inputs.shape[0]
        seq = inputs.shape[1] * (self.topo.tp if (self.sp and not self.first_stage) else 1)
        start_pos = cache.length if cache is not None else 0
        self._check_inputs(inputs, seq, start_pos, cache)
        dtype = next(self.parameters()).dtype
        att, positions = self.attention_inputs(b, seq, doc_ids, start_pos, inputs.device, dtype)

        if self.first_stage:
            x = self.embedding(inputs)  # [b, s(/tp), hidden]
            if self.cfg.position == "learned":
                pos = scatter_to_sp(positions, self.topo.tp_group) if self.sp else positions
                x = x + self.pos_embedding[pos]
            x = self.emb_dropout(x)
        else:
            x = inputs
        for block in self.layers.values():
            x = block(x, att, cache)  # [b, s(/tp), hidden]
        if cache is not None:
            cache.length = start_pos + seq
        if not self.last_stage:
            return x
        x = self.final_norm(x)
        head = self.output_layer
        logits = head.project(x)  # [b, s, padded_vocab/tp]
        if labels is None:
            return logits
        return vocab_parallel_cross_entropy(
            logits, labels, head.vocab_start, self.cfg.vocab_size, self.topo.tp_group, label_smoothing
        )  # [b, s]

    def full_logits(self, local_logits: torch.Tensor) -> torch.Tensor:
        """All-gather vocabulary slices and drop padding: [b, s, vocab] (generation, tests)."""
        return gather_from_tp(local_logits, self.topo.tp_group)[..., : self.cfg.vocab_size]

    def make_cache(self, batch: int, max_len: int) -> KVCache:
        attn = next(iter(self.layers.values())).attn
        params = next(self.parameters())
        return KVCache(list(self.layer_range), batch, max_len, attn.kv_heads, attn.head_dim, params.device, params.dtype)
