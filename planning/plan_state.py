"""Persistent bytes one rank holds, from the config alone: parameters, gradients and the
optimizer state behind `trident plan` (activations are `trident.planning.plan_memory`'s).

The parameter list of a pipeline stage at a tp size (the same local shapes and order as
`trident.model.gpt.GPT`; an MoE block holds its router and all E experts), packed into gradient buckets the way
`trident.parallel.zero.grad_buffer.GradBuffer` packs them (reverse order, deferred
tp-partial / tied parameters last, each bucket padded to a multiple of dp * 16), then
priced as `DistributedOptimizer.memory()` prices them: parameters in the model dtype,
fp32 gradients (only the owned 1/dp shard kept between steps at ZeRO-2), exp_avg and
exp_avg_sq (+ an fp32 master when the model is not fp32) for the owned shard.

ZeRO-3 packs the same parameters into one padded unit per block (and the embedding,
position embedding, final norm and head), as `ShardedParams` does, and keeps 1/dp of each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from trident.model.config import ModelConfig
from trident.parallel.pipeline.stages import stage_layers
from trident.parallel.tensor.layers import padded_vocab_size
from trident.parallel.zero.sharded_params import IN_FLIGHT
from trident.planning.plan_memory import DTYPE_BYTES

ALIGN = 16  # elements; trident.parallel.zero.grad_buffer.ALIGN


# --- parameters and the optimizer -------------------------------------------------------------
@dataclass(frozen=True)
class ParamSpec:
    name: str
    numel: int
    deferred: bool  # reduced after finalisation (tp-partial or pipeline-tied): its own buckets


def rank_chunks(n_layers: int, pp: int, stage: int, split: Sequence[int] | None = None, vpp: int = 1) -> list[range]:
    """The layer ranges of the chunks rank `stage` holds: with `vpp` virtual stages per rank
    the layers are split into pp·vpp contiguous chunks and chunk c of rank r is virtual
    stage c·pp + r (rank r holds chunks r, r+pp, ...); with vpp = 1 its one stage."""
    ranges = stage_layers(n_layers, pp * vpp, split)
    return [ranges[c * pp + stage] for c in range(vpp)]


def stage_params(cfg: ModelConfig, tp: int, pp: int, stage: int, sequence_parallel: bool = False,
                 split: Sequence[int] | None = None, vpp: int = 1) -> list[ParamSpec]:
    """This rank's trainable parameters on one tp rank, in `GPT.named_parameters()` order
    (one module over the union of its chunks' layers, embedding first, head last)."""
    layers = [i for chunk in rank_chunks(cfg.n_layers, pp, stage, split, vpp) for i in chunk]
    first, last = stage == 0, stage == pp - 1
    sp = sequence_parallel and tp > 1
    h, hd = cfg.hidden, cfg.head_dim
    heads = cfg.n_heads // tp
    kv = cfg.kv_heads // tp if cfg.kv_heads % tp == 0 else 1
    f = cfg.ffn // tp
    vocab = padded_vocab_size(cfg.vocab_size, cfg.vocab_pad_multiple, tp) // tp
    tied = cfg.tie_embeddings and pp > 1
    out: list[ParamSpec] = []

    def add(name: str, numel: int, partial: bool = False, is_tied: bool = False) -> None:
        out.append(ParamSpec(name, numel, (partial and tp > 1) or is_tied))

    def norm(prefix: str, dim: int, partial: bool) -> None:
        add(f"{prefix}.weight", dim, partial)
        if cfg.norm == "layernorm" and cfg.bias:
            add(f"{prefix}.bias", dim, partial)

    if first or (last and cfg.tie_embeddings):
        add("embedding.weight", vocab * h, is_tied=tied)
    if first and cfg.position == "learned":
        add("pos_embedding", cfg.max_seq_len * h, partial=sp)
    for i in layers:
        p = f"layers.{i}"
        norm(f"{p}.norm1", h, sp)
        qkv = (heads + 2 * kv) * hd
        add(f"{p}.attn.qkv.weight", qkv * h)
        if cfg.bias:
            add(f"{p}.attn.qkv.bias", qkv)
        add(f"{p}.attn.proj.weight", h * (h // tp))
        if cfg.bias:
            add(f"{p}.attn.proj.bias", h, partial=sp)
        if cfg.qk_norm:
            norm(f"{p}.attn.q_norm", hd, True)
            norm(f"{p}.attn.k_norm", hd, True)
        norm(f"{p}.norm2", h, sp)
        if cfg.is_moe_layer(i):  # router and all E experts, whole on every tp rank (tp-partial under sp)
            e, fe, shared = cfg.moe_experts, cfg.moe_ffn, cfg.moe_shared_experts * cfg.moe_ffn // tp
            add(f"{p}.mlp.router.weight", e * h, partial=sp)
            add(f"{p}.mlp.experts.gate_up", e * 2 * fe * h, partial=sp)
            add(f"{p}.mlp.experts.down", e * h * fe, partial=sp)
            if shared:  # DeepSeek's shared experts: one tp-split SwiGLU (no biases)
                add(f"{p}.mlp.shared.fc.weight", 2 * shared * h)
                add(f"{p}.mlp.shared.proj.weight", h * shared)
            continue
        fc = 2 * f if cfg.activation == "swiglu" else f
        add(f"{p}.mlp.fc.weight", fc * h)
        if cfg.bias:
            add(f"{p}.mlp.fc.bias", fc)
        add(f"{p}.mlp.proj.weight", h * f)
        if cfg.bias:
            add(f"{p}.mlp.proj.bias", h, partial=sp)
    if last:
        norm("final_norm", h, sp)
        if not cfg.tie_embeddings:
            add("head.weight", vocab * h)
    return out


def bucket_sizes(params: Sequence[ParamSpec], dp: int, bucket_size: int) -> list[tuple[int, int]]:
    """(padded numel, used numel) of each gradient bucket, as `GradBuffer` forms them."""
    order = list(reversed(params))
    buckets: list[tuple[int, int]] = []
    multiple = dp * ALIGN
    for group in ([p for p in order if not p.deferred], [p for p in order if p.deferred]):
        used = 0
        for p in group:
            used += p.numel
            if used >= bucket_size:
                buckets.append((-(-used // multiple) * multiple, used))
                used = 0
        if used:
            buckets.append((-(-used // multiple) * multiple, used))
    return buckets


def unit_sizes(params: Sequence[ParamSpec], dp: int) -> list[int]:
    """Padded numel of each ZeRO-3 unit (`GPT.parameter_units`: one per block, and the
    embedding, position embedding, final norm and head each their own), in forward order."""
    units: dict[str, int] = {}
    for p in params:
        parts = p.name.split(".")
        key = f"layers.{parts[1]}" if parts[0] == "layers" else parts[0]
        units[key] = units.get(key, 0) + p.numel
    multiple = dp * ALIGN
    return [-(-n // multiple) * multiple for n in units.values()]


@dataclass(frozen=True)
class StateBytes:
    """The persistent bytes of one rank; the keys of `DistributedOptimizer.memory()`."""

    param_bytes: int
    grad_bytes: int  # kept between steps
    grad_peak_bytes: int  # during backward (ZeRO-2 frees the full buffer only after the reduction)
    optimizer_bytes: int
    numel: int  # parameters (unpadded) on this rank
    padded_numel: int
    param_peak_bytes: int = 0  # during a step: ZeRO-3 adds gathered units to its shards (else param_bytes)


def state_bytes(
    params: Sequence[ParamSpec], dp: int, zero: int, dtype: str, bucket_mb: float, reshard: bool = True
) -> StateBytes:
    """Parameters, gradients and optimizer state of one rank (`DistributedOptimizer.memory`).

    ZeRO-3 (`reshard`: ``optim.zero3_reshard_after_forward``) keeps 1/dp of every unit;
    during a step the largest unit is gathered, with the next one's gather in flight (two
    units), or with ``reshard`` off every unit stays gathered; its fp32 gradient shard
    persists, and a unit's full fp32 gradient exists per reduce-scatter in flight."""
    if zero == 3:
        return _zero3_bytes(params, dp, dtype, reshard)
    bucket_size = max(1, int(bucket_mb * 2**20 / 4))  # OptimizerConfig.bucket_size
    buckets = bucket_sizes(params, dp, bucket_size)
    padded = sum(n for n, _ in buckets)
    shard = padded if zero == 0 else padded // dp
    per_elem = 4 * (2 if dtype == "fp32" else 3)
    return StateBytes(
        param_bytes=padded * DTYPE_BYTES[dtype],
        grad_bytes=(shard if zero == 2 else padded) * 4,
        grad_peak_bytes=padded * 4,
        optimizer_bytes=shard * per_elem,
        numel=sum(p.numel for p in params),
        padded_numel=padded,
        param_peak_bytes=padded * DTYPE_BYTES[dtype],
    )


def _zero3_bytes(params: Sequence[ParamSpec], dp: int, dtype: str, reshard: bool) -> StateBytes:
    """`state_bytes` at ZeRO-3 (`ShardedParams.memory`)."""
    units = unit_sizes(params, dp)
    padded, largest = sum(units), max(units)
    shard, elem = padded // dp, DTYPE_BYTES[dtype]
    gathered = (2 * largest if dp > 1 else largest) if reshard else padded
    return StateBytes(
        param_bytes=shard * elem,
        grad_bytes=shard * 4,
        grad_peak_bytes=shard * 4 + largest * 4 * (1 + IN_FLIGHT),
        optimizer_bytes=shard * 4 * (2 if dtype == "fp32" else 3),
        numel=sum(p.numel for p in params),
        padded_numel=padded,
        param_peak_bytes=shard * elem + gathered * elem,
    )
