"""What a layout costs besides memory: FLOPs, bytes on each link, and a step time.

Split from the planner because this is one model with its own assumptions, all stated
here, that can be read and changed without touching the memory accounting:

* FLOPs: the model FLOPs of `trident.training.metrics.flops_per_token` (what MFU is
  computed from) plus what recomputation repeats (full: every layer's forward;
  selective: the attention scores and weighted sum).
* Bytes each rank sends per step in each group: tp (the layers' all-reduces, or
  all-gathers and reduce-scatters under sequence parallelism, forward and backward,
  again for a full recomputation), pp (activations forward, gradients backward, once
  per chunk: v times as many under the interleaved schedule), dp
  (gradient all-reduce at ZeRO-0; reduce-scatter plus the parameter all-gather at
  ZeRO-1/2, over dp·cp: cp ranks hold the same weights), the tied-embedding gradient
  sum between first and last stage, and cp (ring attention's point-to-point blocks,
  `ring_bytes_per_layer`). Ring algorithms: an all-reduce of n bytes over g ranks sends
  2 (g-1)/g n per rank, an all-gather or reduce-scatter (g-1)/g n.
* Expert parallelism (ep > 1): the expert buckets are reduced (and gathered) over the
  dp/ep ranks holding the same experts, the others over dp (both in "dp"); and per MoE
  layer and microbatch the tokens' all-to-all (`a2a_bytes_per_layer`): a rank sends its
  T·k routed rows' remote share, (ep-1)/ep under uniform routing, to their experts and
  receives as many back in the combine, and the same again in backward (a third time
  when full recomputation reruns the layer). The all-to-all waits on the layer's compute
  and the layer on it, so its time is exposed, on NVLink when the ep group (tp·ep
  consecutive ranks) lies in one node. Not counted: the [E] row-count exchange before
  each dispatch.
* Context parallelism: a rank computes seq_len/cp tokens of each sample, every one of
  them still attending to the whole (causal) sequence, so all its FLOPs, attention's
  included, fall by cp; Megatron's load-balanced chunks make every cp rank's share
  equal, so no rank is the slowest. The ring's transfers overlap the attention of the
  block in hand: per block, only what the transfer takes beyond that compute is exposed.
* A step time from a roofline with the declared device figures
  (`trident.planning.devices`): each stage's microbatch takes max(FLOPs / achievable
  peak, bytes / memory bandwidth) plus its tp and pp transfers (on NVLink inside a node,
  the network across nodes; Megatron's rank order keeps tp innermost), the pipeline
  takes its schedule's ideal time on the slowest stage's costs
  (`trident.parallel.pipeline.schedule.ideal_time`: 1F1B and GPipe (m + pp - 1) slots,
  interleaved (m·v + pp - 1)/v, ZB-H1 m slots + (pp - 1) forwards, its W being the
  weight-gradient matmuls), the dp·cp reduction is exposed beyond the last microbatch's
  backward, and the optimizer streams its state once. It is a model, not a measurement:
  use it to rank layouts.
"""

from __future__ import annotations

from trident.model.config import ModelConfig
from trident.parallel.pipeline.schedule import ideal_time
from trident.parallel.tensor.layers import padded_vocab_size
from trident.planning.devices import Device
from trident.planning.plan import Settings, StagePlan
from trident.planning.plan_memory import DTYPE_BYTES, Shapes
from trident.planning.plan_pipeline import dkv_block_bytes, kv_block_bytes


# --- FLOPs ------------------------------------------------------------------------------------
def _layer_matmul_params(model: ModelConfig) -> int:
    h, f, kv_dim = model.hidden, model.ffn, model.kv_heads * model.head_dim
    dense = h * (h + 2 * kv_dim) + h * h + (3 if model.activation == "swiglu" else 2) * h * f
    n_moe = sum(model.is_moe_layer(i) for i in range(model.n_layers))
    if n_moe:  # MoE layers use the router, k routed and the shared experts per token: the layers' mean
        moe = model.moe_experts * h + (model.moe_top_k + model.moe_shared_experts) * 3 * h * model.moe_ffn
        dense += n_moe * (moe - 3 * h * f) // model.n_layers
    return dense


def recompute_flops_per_token(model: ModelConfig, st: Settings) -> float:
    """Forward FLOPs per token that recomputation repeats in backward."""
    attention = 4.0 * model.n_layers * model.hidden * st.seq_len  # QK^T and PV, forward
    if st.recompute == "full":
        return 2.0 * model.n_layers * _layer_matmul_params(model) + attention
    if st.recompute == "selective":
        return attention
    return 0.0


def _stage_flops_per_microbatch(model: ModelConfig, st: Settings, stage: StagePlan) -> float:
    """Training FLOPs one rank of `stage` spends on one microbatch (with recomputation)."""
    h, s = model.hidden, st.seq_len
    per_token_layer = 6.0 * _layer_matmul_params(model) + 12.0 * h * s
    per_token_layer += recompute_flops_per_token(model, st) / model.n_layers
    per_token = len(stage.layers) * per_token_layer
    if stage.stage == st.pp - 1:
        per_token += 6.0 * model.vocab_size * h
    return per_token * st.micro_batch_size * st.local_seq / st.tp  # this cp rank's tokens


# --- communication ----------------------------------------------------------------------------
def _ring(kind: str, n: float, g: int) -> float:
    """Bytes one rank sends for a collective over `g` ranks on `n` bytes (ring algorithms)."""
    if g <= 1:
        return 0.0
    return (2.0 if kind == "all_reduce" else 1.0) * (g - 1) / g * n


def _tp_bytes_per_microbatch(model: ModelConfig, st: Settings, stage: StagePlan) -> tuple[float, int]:
    """Bytes one tp rank sends for one microbatch on `stage`, and how many collectives."""
    t, e = st.tp, DTYPE_BYTES[st.dtype]
    if t == 1:
        return 0.0, 0
    n = st.micro_batch_size * st.local_seq * model.hidden * e  # a full [b, s/cp, h] activation
    # per layer, forward and backward each: two all-reduces (or an all-gather and a
    # reduce-scatter per all-reduce under sp: the same bytes); full recompute: forward again
    passes = 3 if st.recompute == "full" else 2
    per_layer = passes * 2 * _ring("all_reduce", n, t)
    calls = passes * (4 if st.sp else 2)
    if model.kv_heads % t != 0:  # replicated kv weights: their gradient is summed per microbatch
        replicas = t // model.kv_heads
        per_layer += _ring("all_reduce", 2 * model.head_dim * model.hidden * e, replicas)
        calls += 1
    total = len(stage.layers) * per_layer
    calls *= len(stage.layers)
    if stage.stage == 0:  # embedding: all-reduce (or reduce-scatter, all-gather in backward)
        total += _ring("all_reduce", n, t)
        calls += 2 if st.sp else 1
    if stage.stage == st.pp - 1:  # head input, and the cross-entropy's three [b, s] all-reduces
        total += _ring("all_reduce", n, t) + 3 * _ring("all_reduce", 4 * st.micro_batch_size * st.local_seq, t)
        calls += (2 if st.sp else 1) + 3
    return total, calls


def a2a_bytes_per_layer(model: ModelConfig, st: Settings) -> float:
    """Bytes one rank sends in the all-to-alls of one MoE layer and microbatch (ep > 1):
    dispatch and combine, forward and backward (and the forward again under full
    recomputation), each T·k·(ep-1)/ep rows of h elements under uniform routing; T is
    this rank's tokens of the microbatch (its sequence shard under sp)."""
    if st.ep == 1:
        return 0.0
    tokens = st.micro_batch_size * (st.local_seq // st.tp if st.sp else st.local_seq)
    rows = tokens * model.moe_top_k * (st.ep - 1) / st.ep
    passes = 3 if st.recompute == "full" else 2
    return passes * 2 * rows * model.hidden * DTYPE_BYTES[st.dtype]


def _moe_layers(model: ModelConfig, stage: StagePlan) -> int:
    return sum(model.is_moe_layer(i) for i in stage.layers)


def _boundary_bytes(model: ModelConfig, st: Settings) -> float:
    """Bytes of the activation one microbatch sends between pipeline stages."""
    seq = st.local_seq // st.tp if st.sp else st.local_seq
    return st.micro_batch_size * seq * model.hidden * DTYPE_BYTES[st.dtype]


def comm_bytes(model: ModelConfig, st: Settings, stages: list[StagePlan]) -> dict[str, float]:
    """Bytes the busiest rank sends per step, by group: tp, pp, dp (and the tied embedding,
    cp's ring, ep's all-to-all)."""
    m, e = st.microbatches, DTYPE_BYTES[st.dtype]
    out: dict[str, float] = {}
    out["tp"] = max(_tp_bytes_per_microbatch(model, st, s)[0] for s in stages) * m
    act = _boundary_bytes(model, st)
    # a middle rank sends each chunk's activation on and its gradient back; at pp = 2 the
    # first virtual stage sends no gradient and the last no activation (same rank pair)
    out["pp"] = (2 * st.vpp - (1 if st.pp == 2 else 0)) * m * act if st.pp > 1 else 0.0
    dp = 0.0
    for s in stages:
        experts = s.state.expert_padded_numel  # over dp/ep (ep > 1), the rest over dp·cp
        b = 0.0
        for numel, group in ((s.state.padded_numel - experts, st.dp_cp), (experts, st.edp)):
            if st.zero == 0:
                b += _ring("all_reduce", numel * 4, group)
            elif st.zero == 3:  # per microbatch: a reduce-scatter, and gathers for forward and backward
                gathers = 2 * m if st.zero3_reshard_after_forward else 1
                b += m * _ring("reduce_scatter", numel * 4, group) + gathers * _ring("all_gather", numel * e, group)
            else:
                b += _ring("reduce_scatter", numel * 4, group) + _ring("all_gather", numel * e, group)
        dp = max(dp, b)
    out["dp"] = dp  # over dp·cp (expert buckets over dp/ep)
    if st.cp > 1:
        out["cp"] = max(len(s.layers) for s in stages) * m * sum(ring_bytes_per_layer(model, st))
    if st.ep > 1:
        out["ep"] = max(_moe_layers(model, s) for s in stages) * m * a2a_bytes_per_layer(model, st)
    if model.tie_embeddings and st.pp > 1:
        vocab = padded_vocab_size(model.vocab_size, model.vocab_pad_multiple, st.tp) // st.tp
        out["embedding"] = _ring("all_reduce", vocab * model.hidden * e, 2)
    return out


def _shapes(model: ModelConfig, st: Settings) -> Shapes:
    return Shapes(model, st.micro_batch_size, st.seq_len, st.tp, st.sp, st.dtype, "cuda", st.doc_masking, st.cp)


def ring_bytes_per_layer(model: ModelConfig, st: Settings) -> tuple[float, float]:
    """(forward, backward) bytes one cp rank sends per layer per microbatch in the ring.

    Forward, cp - 1 K/V blocks (its own is computed at home); backward, cp - 1 K/V blocks
    again and cp fp32 dK/dV accumulators (each travels with its block and a last hop
    takes the finished sum home, `trident.parallel.context.ring_attention`).
    Recomputation replays the forward ring in backward: the attention core is rebuilt
    under selective and full.
    """
    if st.cp == 1:
        return 0.0, 0.0
    x = _shapes(model, st)
    kv, dkv = kv_block_bytes(x), dkv_block_bytes(x)
    replay = kv if st.recompute in ("selective", "full") else 0
    return float((st.cp - 1) * kv), float((st.cp - 1) * (kv + replay) + st.cp * dkv)


def ring_time(model: ModelConfig, st: Settings, device: Device, n_layers: int) -> tuple[float, float]:
    """(transfer, exposed) seconds of one microbatch's ring transfers over `n_layers`.

    Each hop is posted before the block in hand is computed and waited on after, so it
    hides behind that block's attention (1/cp of the layer's attention FLOPs on this rank
    forward, twice that in backward): what a hop takes (bytes / link + latency) beyond it
    is exposed. The backward's last dK/dV hop, which takes the sum home, has nothing left
    to hide behind."""
    if st.cp == 1:
        return 0.0, 0.0
    peak = device.peak_tflops(st.dtype) * 1e12 * device.matmul_efficiency
    bw, lat = _bandwidth(device, st.tp * st.cp), device.latency_us * 1e-6
    block = 4.0 * model.hidden * st.seq_len * st.micro_batch_size * st.local_seq / st.tp / st.cp / peak
    x = _shapes(model, st)
    kv, dkv = kv_block_bytes(x) / bw + lat, dkv_block_bytes(x) / bw + lat
    passes = 2 if st.recompute in ("selective", "full") else 1  # forward rings (replayed under recompute)
    hops = st.cp - 1
    transfer = passes * hops * kv + hops * (kv + dkv) + dkv
    exposed = passes * hops * max(0.0, kv - block) + hops * max(0.0, kv + dkv - 2 * block) + dkv
    return n_layers * transfer, n_layers * exposed


# --- time -------------------------------------------------------------------------------------
def _bandwidth(device: Device, group_span: int) -> float:
    """Bytes/s of a group whose ranks lie within `group_span` consecutive global ranks."""
    return 1e9 * (device.intra_gbps if group_span <= device.per_node else device.inter_gbps)


def step_time(
    model: ModelConfig, st: Settings, device: Device, stages: list[StagePlan], comm: dict[str, float]
) -> tuple[float, dict[str, float]]:
    """Predicted seconds per step, and its parts: pipeline, bubble, dp_exposed, optimizer
    (and the ring's and the all-to-all's share of the pipeline)."""
    peak = device.peak_tflops(st.dtype) * 1e12 * device.matmul_efficiency
    hbm = device.hbm_gbps * 1e9
    e = DTYPE_BYTES[st.dtype]
    m = st.microbatches
    lat = device.latency_us * 1e-6
    tp_bw = _bandwidth(device, st.tp)
    dp_bw = _bandwidth(device, st.tp * st.cp * st.dp)
    pp_bw = _bandwidth(device, st.world)
    slot = compute = forward = weight = ring = ring_exposed = a2a = 0.0
    for s in stages:
        flops = _stage_flops_per_microbatch(model, st, s)
        # weights read in forward and twice in backward, fp32 gradients accumulated, the
        # saved activations written and read back (twice over under full recomputation)
        numel = s.state.numel
        traffic = numel * (3 * e + 8) + s.activations.per_microbatch * (4 if st.recompute == "full" else 2)
        work = max(flops / peak, traffic / hbm)
        tp_b, tp_calls = _tp_bytes_per_microbatch(model, st, s)
        ring_s, ring_exposed_s = ring_time(model, st, device, len(s.layers))
        a2a_s = _moe_layers(model, s) * a2a_time_per_layer(model, st, device)
        link = tp_b / tp_bw + tp_calls * lat + ring_exposed_s + a2a_s
        if st.pp > 1:  # an activation and a gradient per chunk
            act = _boundary_bytes(model, st)
            link += 2 * st.vpp * (act / pp_bw + lat)
        if work + link > slot:
            slot, compute, ring, ring_exposed, a2a = work + link, work, ring_s, ring_exposed_s, a2a_s
            # the slot's shares by FLOPs: forward, and the weight-gradient matmuls (ZB-H1's W)
            fwd, w = _forward_and_weight_flops(model, st)
            forward, weight = slot * fwd, slot * w
    pipeline = ideal_time(st.pp, m, forward, slot - forward, st.schedule, st.vpp, t_weight=weight)
    dp_time = comm["dp"] / dp_bw + (2 * lat * max(1, len(stages)) if st.dp_cp > 1 else 0.0)
    if st.overlap_grad_reduce:
        dp_time = max(0.0, dp_time - 2.0 / 3.0 * compute)  # hidden behind the last backward
    optimizer = max((s.optimizer_bytes + s.state.grad_bytes) * 2 / hbm for s in stages)
    total = pipeline + dp_time + optimizer
    parts = {"pipeline": pipeline, "bubble": pipeline - m * slot, "dp_exposed": dp_time, "optimizer": optimizer,
             "ring": m * ring, "ring_exposed": m * ring_exposed,  # cp: the slowest stage's, per step
             "all_to_all": m * a2a}  # ep: the slowest stage's, per step (exposed)
    return total, parts


def a2a_time_per_layer(model: ModelConfig, st: Settings, device: Device) -> float:
    """Seconds of one MoE layer's all-to-alls per microbatch (ep > 1), all exposed: its bytes
    (`a2a_bytes_per_layer`) over the ep group's link, and a latency per call (forward: the
    row-count exchange, dispatch, combine; backward: two; full recomputation: three again)."""
    if st.ep == 1:
        return 0.0
    calls = 8 if st.recompute == "full" else 5
    return a2a_bytes_per_layer(model, st) / _bandwidth(device, st.tp * st.ep) + calls * device.latency_us * 1e-6


def _forward_and_weight_flops(model: ModelConfig, st: Settings) -> tuple[float, float]:
    """The forward's and the weight gradients' shares of a layer's training FLOPs."""
    matmul = 2.0 * _layer_matmul_params(model)  # per token, forward
    forward = matmul + 4.0 * model.hidden * st.seq_len
    total = 3.0 * forward + recompute_flops_per_token(model, st) / model.n_layers
    return forward / total, matmul / total
