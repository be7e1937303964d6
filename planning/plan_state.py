"""Persistent bytes one rank holds, from the config alone: parameters, gradients and the
optimizer state behind `trident plan` (activations are `trident.planning.plan_memory`'s).

The parameter list of a pipeline stage at a tp size (the same local shapes and order as
`trident.model.gpt.GPT`; an MoE block holds its router and E/ep experts), packed into gradient
buckets the way `trident.parallel.zero.grad_buffer.GradBuffer` packs them (reverse order,
deferred tp-partial / tied parameters last, each bucket padded to a multiple of dp * 16), then
priced as `DistributedOptimizer.memory()` prices them: parameters in the model dtype,
fp32 gradients (only the owned 1/dp shard kept between steps at ZeRO-2), exp_avg and
exp_avg_sq (+ an fp32 master when the model is not fp32) for the owned shard.

Expert parallelism (ep > 1): a rank holds E/ep experts of each MoE layer, marked as expert
parameters; every run of expert (or of other) parameters in that order is cut into buckets
of its own, and the expert buckets are padded to multiples of (dp/ep) * 16 and ZeRO-sharded
over the dp/ep ranks that hold the same experts (`Topology.edp`).

ZeRO-3 packs the same parameters into one padded unit per block (and the embedding,
position embedding, final norm and head), as `ShardedParams` does, and keeps 1/dp of each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

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
    expert: bool = False  # held by E/ep ranks (ep > 1): buckets of its own, sharded over dp/ep


class BucketSize(NamedTuple):
    numel: int  # padded
    used: int
    shards: int  # the ranks it is reduced and ZeRO-sharded over: dp (dp·cp), or dp/ep for experts
    expert: bool = False


def rank_chunks(n_layers: int, pp: int, stage: int, split: Sequence[int] | None = None, vpp: int = 1) -> list[range]:
    """The layer ranges of the chunks rank `stage` holds: with `vpp` virtual stages per rank
    the layers are split into pp·vpp contiguous chunks and chunk c of rank r is virtual
    stage c·pp + r (rank r holds chunks r, r+pp, ...); with vpp = 1 its one stage."""
    ranges = stage_layers(n_layers, pp * vpp, split)
    return [ranges[c * pp + stage] for c in range(vpp)]


def stage_params(cfg: ModelConfig, tp: int, pp: int, stage: int, sequence_parallel: bool = False,
                 split: Sequence[int] | None = None, vpp: int = 1, ep: int = 1) -> list[ParamSpec]:
    """This rank's trainable parameters on one tp rank, in `GPT.named_parameters()` order
    (one module over the union of its chunks' layers, embedding first, head last), with
    E/ep experts per MoE layer."""
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
        if cfg.is_moe_layer(i):
            out += _moe_params(cfg, f"{p}.mlp", tp, sp, ep)
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


def _moe_params(cfg: ModelConfig, prefix: str, tp: int, sp: bool, ep: int) -> list[ParamSpec]:
    """An MoE block's MLP: the router, and E/ep experts whole on every tp rank (tp-partial
    under sp, expert parameters under ep > 1), then any shared experts as one tp-split SwiGLU."""
    e, h, fe, shared = cfg.moe_experts, cfg.hidden, cfg.moe_ffn, cfg.moe_shared_experts * cfg.moe_ffn // tp
    out = [ParamSpec(f"{prefix}.router.weight", e * h, sp),
           ParamSpec(f"{prefix}.experts.gate_up", e // ep * 2 * fe * h, sp, ep > 1),
           ParamSpec(f"{prefix}.experts.down", e // ep * h * fe, sp, ep > 1)]
    if shared:  # DeepSeek's shared experts (no biases)
        out += [ParamSpec(f"{prefix}.shared.fc.weight", 2 * shared * h, False),
                ParamSpec(f"{prefix}.shared.proj.weight", h * shared, False)]
    return out


def bucket_sizes(params: Sequence[ParamSpec], dp: int, bucket_size: int, edp: int | None = None) -> list[BucketSize]:
    """Each gradient bucket as `GradBuffer` forms them: a bucket closes when it reaches
    `bucket_size` or the next parameter is of the other kind (expert or not); expert
    buckets are padded for, and sharded over, `edp` ranks (dp/ep), the others over `dp`."""
    order = list(reversed(params))
    buckets: list[BucketSize] = []

    def close(used: int, expert: bool) -> None:
        shards = (edp or dp) if expert else dp
        multiple = shards * ALIGN
        buckets.append(BucketSize(-(-used // multiple) * multiple, used, shards, expert))

    for group in ([p for p in order if not p.deferred], [p for p in order if p.deferred]):
        used, expert = 0, False
        for p in group:
            if used and p.expert != expert:  # a bucket reduces over one group
                close(used, expert)
                used = 0
            used, expert = used + p.numel, p.expert
            if used >= bucket_size:
                close(used, expert)
                used = 0
        if used:
            close(used, expert)
    return buckets


def unit_sizes(params: Sequence[ParamSpec], dp: int, edp: int | None = None) -> list[tuple[str, int, int]]:
    """(unit, padded numel, ranks it is sharded over) of each ZeRO-3 unit, in forward order
    (`GPT.parameter_units`: one per block, and the embedding, position embedding, final norm
    and head each their own); under expert parallelism a block's experts are a unit of their
    own, ``layers.N.experts``, sharded over `edp` (dp/ep) ranks (`ShardedParams.experts_of`)."""
    units: dict[str, list] = {}
    for p in params:
        parts = p.name.split(".")
        key = f"layers.{parts[1]}" if parts[0] == "layers" else parts[0]
        key, shards = (f"{key}.experts", edp or dp) if p.expert else (key, dp)
        units.setdefault(key, [0, shards])[0] += p.numel
    return [(k, -(-n // (r * ALIGN)) * (r * ALIGN), r) for k, (n, r) in units.items()]


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
    expert_padded_numel: int = 0  # of padded_numel, the expert buckets' (reduced over dp/ep; ep > 1)


def state_bytes(
    params: Sequence[ParamSpec], dp: int, zero: int, dtype: str, bucket_mb: float, reshard: bool = True,
    edp: int | None = None,
) -> StateBytes:
    """Parameters, gradients and optimizer state of one rank (`DistributedOptimizer.memory`).

    `edp`: the ranks expert buckets are sharded over (dp/ep under expert parallelism).

    ZeRO-3 (`reshard`: ``optim.zero3_reshard_after_forward``) keeps 1/dp of every unit;
    during a step the largest unit is gathered, with the next one's gather in flight (two
    units), or with ``reshard`` off every unit stays gathered; its fp32 gradient shard
    persists, and a unit's full fp32 gradient exists per reduce-scatter in flight."""
    if zero == 3:
        return _zero3_bytes(params, dp, dtype, reshard, edp)
    bucket_size = max(1, int(bucket_mb * 2**20 / 4))  # OptimizerConfig.bucket_size
    buckets = bucket_sizes(params, dp, bucket_size, edp)
    padded = sum(b.numel for b in buckets)
    shard = padded if zero == 0 else sum(b.numel // b.shards for b in buckets)
    per_elem = 4 * (2 if dtype == "fp32" else 3)
    return StateBytes(
        param_bytes=padded * DTYPE_BYTES[dtype],
        grad_bytes=(shard if zero == 2 else padded) * 4,
        grad_peak_bytes=padded * 4,
        optimizer_bytes=shard * per_elem,
        numel=sum(p.numel for p in params),
        padded_numel=padded,
        param_peak_bytes=padded * DTYPE_BYTES[dtype],
        expert_padded_numel=sum(b.numel for b in buckets if b.expert),
    )


def _zero3_bytes(params: Sequence[ParamSpec], dp: int, dtype: str, reshard: bool, edp: int | None) -> StateBytes:
    """`state_bytes` at ZeRO-3 (`ShardedParams.memory`: a block is gathered with its experts)."""
    units = unit_sizes(params, dp, edp)
    padded = sum(n for _, n, _ in units)
    shard, elem = sum(n // r for _, n, r in units), DTYPE_BYTES[dtype]
    sizes = dict((k, n) for k, n, _ in units)
    largest = max(n + sizes.get(f"{k}.experts", 0) for k, n, _ in units if not k.endswith(".experts"))
    gathered = (2 * largest if dp > 1 else largest) if reshard else padded
    return StateBytes(
        param_bytes=shard * elem,
        grad_bytes=shard * 4,
        grad_peak_bytes=shard * 4 + largest * 4 * (1 + IN_FLIGHT),
        optimizer_bytes=shard * 4 * (2 if dtype == "fp32" else 3),
        numel=sum(p.numel for p in params),
        padded_numel=padded,
        param_peak_bytes=shard * elem + gathered * elem,
        expert_padded_numel=sum(n for k, n, _ in units if k.endswith(".experts")),
    )
