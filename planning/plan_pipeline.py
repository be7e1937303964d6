"""What a rank holds over a pipeline step: its activation peak, walked along its schedule.

`trident.planning.plan_memory` prices what one microbatch saves in one layer; this module
prices a step. A rank's schedule (`trident.parallel.pipeline.schedule`) is a list of F, B
and (zero-bubble) W steps on (chunk, microbatch) pairs. Rather than a formula per
schedule, the planner walks that list, so a new schedule brings its own memory:

* An F adds what the microbatch keeps through that chunk (`ChunkBytes.full`). Chunks
  differ: the layers of each (``stage_layers(n_layers, pp·vpp)``; MoE and dense blocks
  each priced as what they are), the embedding on virtual stage 0, the final norm, head
  and loss on the last.
* A B releases it. While it runs, the microbatch may briefly hold more: recomputation
  rebuilds the layer (full) or the attention core (selective) the backward is in, after
  what the backward already passed has been freed (`ChunkBytes.backward`).
* With a split backward (ZB-H1: a W of the same pair follows), the B leaves behind, per
  layer, the tensor-parallel linears' W closures (`trident.parallel.tensor.weight_grad`):
  each keeps its saved input and the gradient of its output (`weight_pending_layer_bytes`)
  until the W runs (the row linears' output gradients as sequence shards under sequence
  parallelism: the W re-gathers them). That share can exceed a whole microbatch's saved
  tensors: the output gradients are new memory. The head never defers its W (it would
  keep a logits-sized gradient), nor do an MoE block's router and experts (only its
  shared experts and its attention are tensor-parallel linears).

The peak is the largest sum of what is held at any point, plus the backward's transient.
1F1B: ``(k - 1)·A + peak(one microbatch)`` with k = min(pp - r, m); GPipe with k = m;
interleaved: on rank 0, (pp-1)·2 + (vpp-1)·pp + 1 chunk-microbatches at once for large m.

The W closures are plain Python references, not tensors autograd saves; the activation
meter counts them anyway (`weight_grad.observe`), so `MemoryReport.activation_bytes`
measures this same peak.

Pipeline buffers. A stage's output is freed once it has been sent (Megatron's
``deallocate_output_tensor``: only the autograd graph is kept), and a received input is
saved by the chunk's first layer (its norm, or the checkpoint under full recomputation),
so it is already counted, by storage, in the activations. What the executor holds besides
is one batch of transfers in flight: what it sends and what it receives in it.

Ring buffers. Under context parallelism each layer's attention passes K/V blocks (and in
backward their fp32 dK/dV accumulators) around the cp ring, double-buffered; they are
allocated and freed within the layer's attention, never saved, so they join the peak
once, on top of what the walk finds (`ring_buffer_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from trident.parallel.pipeline.schedule import Step, peak_in_flight, schedule_steps
from trident.planning.plan_memory import (
    Shapes,
    attention_core_bytes,
    embedding_bytes,
    head_bytes,
    layer_bytes,
    mlp_input_bytes,
    shared_bytes,
)


# --- one microbatch through one chunk ---------------------------------------------------------
def _mlp_width(x: Shapes, moe: bool) -> int:
    """Output width of the first tensor-parallel MLP linear on this rank: the dense MLP's,
    or in an MoE block its shared experts' (0 without: its router and experts are not
    tensor-parallel linears and compute their weight gradients in B)."""
    c = x.cfg
    if moe:
        return 2 * (c.moe_shared_experts * c.moe_ffn // x.tp)
    return 2 * x.f if c.activation == "swiglu" else x.f


def _grads(x: Shapes, moe: bool = False) -> dict[str, int]:
    """The output gradients a split B keeps per layer, in the compute dtype: the column
    linears' [b, s, out/tp], the row linears' [b, s(/tp), h] (under sp the gradient arrives
    gathered and only this rank's sequence shard is kept, `lean_linear._kept_output_grad`)."""
    c, b, s, sr, h, e = x.cfg, x.b, x.s, x.sr, x.cfg.hidden, x.e
    fc = _mlp_width(x, moe)
    return {"mlp_proj": e * b * sr * h if fc else 0, "fc": e * b * s * fc, "proj": e * b * sr * h,
            "qkv": e * b * s * (x.heads + 2 * x.kv) * c.head_dim}


def weight_pending_layer_bytes(x: Shapes, moe: bool = False) -> int:
    """What one layer of a microbatch keeps between its B and its W when the backward is
    split (ZB-H1, `trident.parallel.tensor.weight_grad`): each tensor-parallel linear's
    closure holds the input its forward saved and the gradient of its output. Inputs: the
    qkv's and the MLP's first linear's (the local sequence shard under sp), the attention
    output (the projection's), the first MLP linear's output before the activation (the
    second's); an MoE block's MLP linears are its shared experts' (none without).
    Everything else of the layer is freed by the B."""
    c, b, s, sr, h, e = x.cfg, x.b, x.s, x.sr, x.cfg.hidden, x.e
    fc = _mlp_width(x, moe)
    mlp_input = sr * h if fc else 0  # the shared experts' linear keeps it (an MoE block without them: nothing)
    return e * b * (sr * h + mlp_input + s * x.heads * c.head_dim + s * fc) + sum(_grads(x, moe).values())


def _split_layer_events(x: Shapes, recompute: str, moe: bool = False) -> list[int]:
    """The changes in held bytes, in order, as a split B passes one (pre-norm) layer: each
    linear's output gradient joins its closure, each node's other saved tensors go (an
    MoE block's routed part, and its input unless shared experts keep it, with its B)."""
    none = layer_bytes(x, "none", moe)
    g = _grads(x, moe)
    norm, mask = none["norms"] // 2, none.get("dropout_masks", 0) // 2
    out = x.e * x.b * x.s * x.heads * x.cfg.head_dim  # the attention output: the projection's input, kept
    core = -(none["attention_core"] - out) - none.get("qkv", 0)
    if recompute == "selective":  # the core is rebuilt, then freed with the qkv the checkpoint kept
        rebuilt = attention_core_bytes(x) - (out if x.output_copied else 0)
        core = [rebuilt, -rebuilt - layer_bytes(x, "selective", moe)["qkv"]]
    mlp = [g["mlp_proj"], g["fc"]]
    if moe:  # all but the shared experts' first output ([b, s, fc]) goes
        fc = _mlp_width(x, moe)
        mlp.append(-(none["mlp"] - x.e * x.b * x.s * fc) - (0 if fc else mlp_input_bytes(x, moe)))
    events = [-mask, *mlp, -norm, -mask, g["proj"], *([core] if isinstance(core, int) else core), g["qkv"], -norm]
    if recompute == "full":  # the layer is rebuilt first; the kept block input (norm1's) goes last
        block = x.e * x.b * x.sr * x.cfg.hidden
        events = [sum(none.values()) - block, *events[:-1], -(norm - block), -block]
    return events


def _backward_extra(x: Shapes, recompute: str, moe: bool) -> int:
    """What a layer's backward holds while it runs, beyond what the layer kept: recomputation
    rebuilds the layer (full) or, once the MLP and the projection have been passed, the
    attention core (selective)."""
    if recompute == "full":  # the kept block input is saved as it is (by the first norm, or post-norm by the qkv)
        return sum(layer_bytes(x, "none", moe).values()) - x.e * x.b * x.sr * x.cfg.hidden
    if recompute != "selective":
        return 0
    layer = layer_bytes(x, "selective", moe)
    freed = layer["mlp"] + mlp_input_bytes(x, moe) + layer["attention_output"] + layer["norms"] // 2
    freed += layer.get("dropout_masks", 0)
    rebuilt = attention_core_bytes(x)
    if x.output_copied:  # the output copy is the projection's, not rebuilt here
        rebuilt -= x.e * x.b * x.s * x.heads * x.cfg.head_dim
    return rebuilt - freed


@dataclass(frozen=True)
class ChunkBytes:
    """One microbatch through one chunk of layers on this rank (a whole stage without
    virtual stages)."""

    full: int  # A: kept from its forward to its backward
    backward: int  # the most it holds while its backward runs (>= A under recomputation)
    pending: int = 0  # kept from its B to its W when the backward is split (0 otherwise)
    backward_split: int = 0  # the most it holds during a B whose W is deferred


def chunk_bytes(x: Shapes, layers: Sequence[int], first: bool, last: bool, recompute: str,
                split: bool = False) -> ChunkBytes:
    """What one microbatch keeps through a chunk of `layers` (with the embedding when
    `first`, the final norm, head and loss when `last`), and during its backward; each
    layer priced as the block it is, MoE or dense (`ModelConfig.is_moe_layer`)."""
    kinds = [x.cfg.is_moe_layer(i) for i in layers]
    kept = {moe: sum(layer_bytes(x, recompute, moe).values()) for moe in set(kinds)}
    head = head_bytes(x) if last else 0
    rest = shared_bytes(x, recompute) + (embedding_bytes(x) if first else 0)
    a = sum(kept[moe] for moe in kinds) + rest + head
    # the backward frees the head first, then walks the layers last first: each holds its
    # recomputation's extra on top of what it and the layers before it still keep
    held, during = a - head, a
    for moe in reversed(kinds):
        during = max(during, held + _backward_extra(x, recompute, moe))
        held -= kept[moe]
    if not split:
        return ChunkBytes(a, during)
    # a split B: the head's backward (not deferred), then each layer, last first, turns from
    # its saved tensors into its W closures; the shared tables and the embedding go last
    held = peak = a - head
    for moe in reversed(kinds):
        for change in _split_layer_events(x, recompute, moe):
            held += change
            peak = max(peak, held)
    pending = sum(weight_pending_layer_bytes(x, moe) for moe in kinds)
    assert held - rest == pending, (held, rest, pending)  # the events end on what the closures keep
    return ChunkBytes(a, during, pending, max(a, peak))


# --- a step ---------------------------------------------------------------------------------
def walk_peak(steps: Sequence[Step], chunks: Sequence[ChunkBytes]) -> int:
    """The most bytes held at once along `steps`, with `chunks[c]` the bytes of one
    microbatch through this rank's chunk c."""
    deferred = {s.key for s in steps if s.kind == "W"}
    held = peak = 0
    for step in steps:
        c = chunks[step.chunk]
        if step.kind == "F":
            held += c.full
            peak = max(peak, held)
        elif step.kind == "B":
            split = step.key in deferred
            peak = max(peak, held - c.full + (c.backward_split if split else c.backward))
            held += (c.pending if split else 0) - c.full
        else:
            held -= c.pending
    return peak


def pipeline_buffer_bytes(x: Shapes, pp: int, vpp: int) -> int:
    """What the executor holds besides autograd's saved tensors, at most: one batch of
    transfers, [b, s(/tp), h] each. One stage per rank: what a step sends and what the
    next receives (an output and a gradient, or a gradient and an input); interleaved
    rounds of F + B: an output and a gradient sent, an input and a gradient received."""
    if pp == 1:
        return 0
    return (4 if vpp > 1 else 2) * x.e * x.b * x.sr * x.cfg.hidden


def kv_block_bytes(x: Shapes) -> int:
    """One K/V block of the ring: k and v, [b, kv/tp, s/cp, head_dim] each, in the compute
    dtype (only the kv heads travel, never the repeated ones)."""
    return 2 * x.e * x.b * x.kv * x.s * x.cfg.head_dim


def dkv_block_bytes(x: Shapes) -> int:
    """One dK/dV accumulator of the ring's backward: a K/V block's shape in fp32."""
    return 2 * 4 * x.b * x.kv * x.s * x.cfg.head_dim


def ring_buffer_bytes(x: Shapes) -> tuple[int, int]:
    """(forward, backward) bytes ring attention holds in one layer besides saved tensors.

    As `trident.parallel.context.ring_attention` allocates them: forward, two K/V blocks
    (a stacked copy of the rank's own, then alternately the block in hand and the one
    arriving); backward, the same two and three fp32 dK/dV accumulators (the one this
    step adds into, the previous one still being sent on, the one arriving). Only one
    layer's attention runs at a time, so the larger of the two sits on top of the step's
    peak once, like the pipeline's transfers; the meter never sees them (autograd does
    not save them). Not counted, as for every kernel: the fp32 score and gradient
    temporaries of one (query half, key half) pair. Nothing at cp = 1.
    """
    if x.cp == 1:
        return 0, 0
    return 2 * kv_block_bytes(x), 2 * kv_block_bytes(x) + 3 * dkv_block_bytes(x)


@dataclass(frozen=True)
class ActivationBytes:
    per_microbatch: int  # A: what one microbatch keeps on this rank through all its chunks
    in_flight: int  # most (chunk, microbatch) pairs held at once (forwarded, not done)
    peak: int  # the step's peak along the schedule, W closures included
    pipeline_buffer: int  # transfers in flight the executor holds (not saved by autograd)
    weight_pending: int = 0  # one microbatch between its B and its W, all chunks (split backward)
    ring_buffer: int = 0  # ring attention's K/V (+ dK/dV) blocks in flight, cp > 1 (`ring_buffer_bytes`)


def rank_activation_bytes(
    x: Shapes, schedule: str, pp: int, stage: int, microbatches: int, chunks: Sequence[range], recompute: str,
) -> ActivationBytes:
    """Rank `stage`'s activations over one step of `schedule`, its layers in `chunks`
    (one range per virtual stage, `plan_state.rank_chunks`)."""
    vpp = len(chunks)
    steps = schedule_steps(schedule, pp, stage, microbatches, vpp)
    split = any(s.kind == "W" for s in steps)
    per_chunk = [
        chunk_bytes(x, layers, stage == 0 and c == 0, stage == pp - 1 and c == vpp - 1, recompute, split)
        for c, layers in enumerate(chunks)
    ]
    return ActivationBytes(
        per_microbatch=sum(c.full for c in per_chunk),
        in_flight=peak_in_flight(steps),
        peak=walk_peak(steps, per_chunk),
        pipeline_buffer=pipeline_buffer_bytes(x, pp, vpp),
        weight_pending=sum(c.pending for c in per_chunk),
        ring_buffer=max(ring_buffer_bytes(x)),
    )
