"""A decoder-only transformer written with tensor-parallel layers, top to bottom:
MLP, block, model (norms in `norms`, positions, masks and attention in `attention`).

At tp=1 every parallel layer is a plain layer and this reads as a single-device GPT. The
model can also be built as one pipeline stage: a contiguous range of layers, with the
embedding only on the first stage and the final norm, head and loss only on the last.

Activations are batch-first. Shapes use ``s`` for the full sequence and ``s/tp`` where
sequence parallelism shards it; ``heads/tp`` and ``kv/tp`` are this rank's heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trident.errors import UserError
from trident.model.attention import (
    Attention,
    AttentionInputs,
    KVCache,
    alibi_slopes,
    document_positions,
    document_segments,
    ring_inputs,
    rope_tables,
)
from trident.model.config import ModelConfig
from trident.model.moe import MoE
from trident.model.norms import make_norm
from trident.parallel.random import REPLICATED, TP, RNGStreams
from trident.parallel.recompute import checkpoint
from trident.parallel.tensor.cross_entropy import vocab_parallel_cross_entropy
from trident.parallel.tensor.layers import Block, ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from trident.parallel.tensor.mappings import gather_from_tp, scatter_to_sp
from trident.parallel.tensor.sharding import (
    Piece,
    init_parameters,
    mark_pipeline_tied,
    mark_tp_partial_grad,
    set_pieces,
)
from trident.parallel.topology import Topology
from trident.parallel.zero.units import UnitHooks, run_unit

# Activation recomputation in training (`trident.parallel.recompute`): none keeps every
# activation; selective rebuilds each attention core (QK-norm, RoPE, QK^T, softmax,
# dropout, .V) in backward and keeps only the qkv output; full keeps only each block's
# input and rebuilds the whole block. Dropout masks replay exactly (the RNG streams are
# restored for the recomputation), so the step is the same in every mode.
RECOMPUTE = ("none", "selective", "full")


# --- MLP -----------------------------------------------------------------------------------
class MLP(nn.Module):
    """SwiGLU (fused gate+up, each rank holding matching slices of both) or GeLU."""

    def __init__(self, cfg: ModelConfig, topo: Topology, sp: bool, device, dtype, width: int | None = None):
        super().__init__()
        f, tp, r = width or cfg.ffn, topo.tp, topo.tp_rank
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
        # the activation's output (ffn wide) is rebuilt from h in backward, not kept
        return self.proj(h, "swiglu" if self.swiglu else "gelu")


def _make_mlp(cfg: ModelConfig, topo: Topology, layer: int, sp: bool, device, dtype) -> nn.Module:
    """The dense MLP, or an MoE layer (`trident.model.moe`) where `ModelConfig.is_moe_layer` says so."""
    if not cfg.is_moe_layer(layer):
        return MLP(cfg, topo, sp, device, dtype)
    width = cfg.moe_shared_experts * cfg.moe_ffn  # DeepSeek's shared experts, as one tp-split MLP
    shared = MLP(cfg, topo, sp, device, dtype, width=width) if width else None
    return MoE(cfg, topo, layer, sp, shared, device, dtype)


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
        self.mlp = _make_mlp(cfg, topo, layer, sp, device, dtype)
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

    Virtual stages (the interleaved pipeline schedule): `chunks` lists the layer ranges of
    this rank's chunks (not contiguous: chunk c of rank r is virtual stage c·pp + r), and
    ``forward(..., chunk=c)`` runs one of them. All the rank's layers live in one module
    under their global indices, so parameter names, checkpoints and the optimizer do not
    know about chunks; the embedding belongs to chunk 0 of the first rank, the final norm,
    head and loss to the last chunk of the last rank.
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
        chunks: list[range] | None = None,
    ) -> None:
        super().__init__()
        cfg.check_tp(topo.tp, topo.ep)
        if recompute not in RECOMPUTE:
            raise UserError(f"recompute is {recompute!r}; valid values are {', '.join(RECOMPUTE)}")
        if topo.cp > 1 and cfg.attention_dropout > 0:
            raise UserError(
                f"model.attention_dropout={cfg.attention_dropout} cannot be used with context parallelism "
                f"(cp={topo.cp}): ring attention has no dropout; set model.attention_dropout=0 or cp=1"
            )
        if topo.cp > 1 and cfg.moe_experts > 0:
            raise UserError(f"MoE layers (model.moe_experts={cfg.moe_experts}) are not yet supported with "
                            f"context parallelism (cp={topo.cp}); set cp=1")
        self.recompute = recompute
        self.cfg, self.topo, self.rng = cfg, topo, rng
        self.unit_hooks: UnitHooks | None = None  # installed by ZeRO-3 (`ShardedParams`)
        self.layer_range = layers if layers is not None else range(cfg.n_layers)
        self.chunks = list(chunks) if chunks is not None else [self.layer_range]
        self.vpp = len(self.chunks)
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
            if cfg.tie_embeddings and not (first_stage and last_stage):
                mark_pipeline_tied(self.embedding.weight, duplicate=not first_stage)
        if first_stage and cfg.position == "learned":
            self.pos_embedding = nn.Parameter(torch.empty(cfg.max_seq_len, cfg.hidden, **kw))
            shape = (cfg.max_seq_len, cfg.hidden)
            piece = Piece("pos_embedding", shape, 0, 0, shape[0], 0, "normal", cfg.init_std, replicas=-1)
            set_pieces(self.pos_embedding, [piece])
            if self.sp:
                mark_tp_partial_grad(self.pos_embedding)
        self.emb_dropout = _HiddenDropout(cfg.dropout, rng, self.sp)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(cfg, topo, i, self.sp, rng, device, dtype, recompute)
             for chunk in self.chunks for i in chunk}
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

        Packed documents (no ALiBi, start_pos 0) get no s x s mask: None when every row
        holds one document (causal SDPA), else `document_segments`' CPU table (causal SDPA
        per document, read from `doc_ids` where it lies: given on the CPU, as the pipeline
        executor passes the loader's batch, that costs no host-device sync). ALiBi and
        KV-cache decoding (start_pos > 0) keep the dense mask, additive in the compute
        `dtype`: SDPA would otherwise turn a bool mask into an additive one inside every
        layer, and every layer's attention would save its own [b, 1, s, s] copy for
        backward; made once here, they all save this one.
        """
        if self.topo.cp > 1:
            alibi = self.alibi if self.cfg.position == "alibi" else None
            rope = (self.rope_cos, self.rope_sin) if self.cfg.position == "rope" else None
            return ring_inputs(self.topo, batch, seq, doc_ids, device, rope, alibi)
        q_abs = torch.arange(start_pos, start_pos + seq, device=device)
        k_abs = torch.arange(0, start_pos + seq, device=device)
        doc_host = doc_ids  # [b, s] wherever the caller had it (the segment table is made from it)
        if doc_ids is not None:
            doc_ids = doc_ids.to(device, non_blocking=True)
            positions = document_positions(doc_ids)  # [b, s]
        else:
            positions = q_abs.unsqueeze(0).expand(batch, seq)
        mask = None
        if doc_ids is not None and start_pos == 0 and self.cfg.position != "alibi":
            mask = document_segments(doc_host)  # [n_segments, 4] int64 on the CPU, or None
        elif doc_ids is not None or start_pos > 0 or self.cfg.position == "alibi":
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

    def _check_inputs(
        self, inputs: torch.Tensor, seq: int, start_pos: int, cache: KVCache | None, first: bool
    ) -> None:
        limit, cp = self.cfg.max_seq_len, self.topo.cp
        if start_pos + seq * cp > limit and self.cfg.position in ("learned", "rope"):
            raise UserError(f"sequence of {start_pos + seq * cp} tokens is longer than model.max_seq_len={limit}")
        if cache is not None and cp > 1:
            raise UserError(f"a KV cache (incremental decoding) cannot be used with context parallelism (cp={cp}); "
                            f"generate at cp=1")
        if cache is not None and start_pos + seq > cache.max_len:
            raise UserError(f"{start_pos + seq} tokens do not fit the KV cache of {cache.max_len}")
        if cache is not None and self.sp:
            raise UserError("a KV cache (incremental decoding) cannot be used with sequence parallelism")
        if self.sp and seq % self.topo.tp != 0:
            raise UserError(f"sequence length {seq} is not divisible by tp={self.topo.tp} (sequence parallelism)")
        if first:
            if inputs.dtype not in (torch.int32, torch.int64):
                raise UserError(f"the first stage takes token ids, got a {inputs.dtype} tensor")
            # the value check reads the ids back: only where that costs no host-device sync
            # (training validates the CPU batch in the data loader instead)
            on_host = inputs.device.type == "cpu"
            if on_host and inputs.numel() and (int(inputs.min()) < 0 or int(inputs.max()) >= self.cfg.vocab_size):
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
        chunk: int = 0,
    ) -> torch.Tensor:
        # inputs: tokens [b, s] (first stage) or hidden [b, s(/tp), hidden]
        # labels, doc_ids: [b, s]
        first = self.first_stage and chunk == 0
        last = self.last_stage and chunk == self.vpp - 1
        b = inputs.shape[0]
        seq = inputs.shape[1] * (self.topo.tp if (self.sp and not first) else 1)
        start_pos = cache.length if cache is not None else 0
        self._check_inputs(inputs, seq, start_pos, cache, first)
        dtype = next(self.parameters()).dtype
        att, positions = self.attention_inputs(b, seq, doc_ids, start_pos, inputs.device, dtype)

        hooks = self.unit_hooks  # ZeRO-3 gathers each unit's parameters around its call
        if first:
            x = run_unit(hooks, "embedding", self.embedding, inputs)  # [b, s(/tp), hidden]
            if self.cfg.position == "learned":
                pos = scatter_to_sp(positions, self.topo.tp_group) if self.sp else positions
                x = x + run_unit(hooks, "pos_embedding", self._position_rows, pos)
            x = self.emb_dropout(x)
        else:
            x = inputs
        for i in self.chunks[chunk]:
            x = run_unit(hooks, f"layers.{i}", self.layers[str(i)], x, att, cache)  # [b, s(/tp), hidden]
        if cache is not None:
            cache.length = start_pos + seq
        if not last:
            return x
        x = run_unit(hooks, "final_norm", self.final_norm, x)
        head_unit = "embedding" if self.cfg.tie_embeddings else "head"
        return run_unit(hooks, head_unit, self._head, x, labels, label_smoothing)

    def _position_rows(self, pos: torch.Tensor) -> torch.Tensor:
        # pos: [b, s(/tp)]  ->  [b, s(/tp), hidden]
        return self.pos_embedding[pos]

    def _head(self, x: torch.Tensor, labels: torch.Tensor | None, label_smoothing: float) -> torch.Tensor:
        # x: [b, s(/tp), hidden]  ->  logits [b, s, padded_vocab/tp], or the per-token loss [b, s]
        head = self.output_layer
        logits = head.project(x)  # [b, s, padded_vocab/tp], or [b, s, vocab] at tp = 1
        if labels is None:
            return logits
        return vocab_parallel_cross_entropy(
            logits, labels, head.vocab_start, self.cfg.vocab_size, self.topo.tp_group, label_smoothing
        )  # [b, s]

    def parameter_units(self) -> dict[str, list[str]]:
        """Parameter names by unit, in forward order, for ZeRO-3 (`trident.parallel.zero.units`):
        one unit per block, and the embedding, position embedding, final norm and head each
        their own (a tied head is the embedding's unit)."""
        units: dict[str, list[str]] = {}
        for name, _ in self.named_parameters():
            parts = name.split(".")
            units.setdefault(f"layers.{parts[1]}" if parts[0] == "layers" else parts[0], []).append(name)
        return units

    def full_logits(self, local_logits: torch.Tensor) -> torch.Tensor:
        """All-gather vocabulary slices and drop padding: [b, s, vocab] (generation, tests)."""
        return gather_from_tp(local_logits, self.topo.tp_group)[..., : self.cfg.vocab_size]

    def make_cache(self, batch: int, max_len: int) -> KVCache:
        attn = next(iter(self.layers.values())).attn
        params = next(self.parameters())
        return KVCache([i for chunk in self.chunks for i in chunk], batch, max_len, attn.kv_heads, attn.head_dim, params.device, params.dtype)
