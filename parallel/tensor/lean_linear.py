"""Linears that keep less for backward than autograd would, as Megatron's do.

Plain autograd saves a linear's input as it was given to the matmul. Two inputs are
cheaper to rebuild than to keep:

* **The all-gathered sequence** of a column-parallel linear under sequence parallelism
  (`gathered_linear`). Autograd would keep the full ``[b, s, hidden]`` gather in every
  such linear (the qkv, the MLP's first linear, the head): 2·s·b·h bytes per layer not
  divided by tp. Megatron keeps the local ``s/tp`` shard and all-gathers it again in
  backward ("Reducing Activation Recomputation in Large Transformer Models", §4.2.2):
  the gather is issued asynchronously, the input-gradient matmul (which does not need
  it) runs meanwhile, and only the weight-gradient matmul waits for it; the
  input-gradient reduce-scatter then runs under the weight-gradient matmul.

* **An elementwise activation's output** feeding the MLP's second linear
  (`activation_linear`): SwiGLU's ``silu(gate) * up`` or GeLU's output, ffn wide. Its
  input (gate and up, or the GeLU input) is kept anyway, so the output is rebuilt in
  backward by one elementwise pass instead of being stored (ffn·s·b elements less per
  layer), and the activation's own backward runs on that input directly (SwiGLU's
  autograd would also keep ``silu(gate)``: another ffn·s·b).

Both are autograd Functions whose backward computes the same gradients as autograd of
the plain ops (to float rounding), so every layout still computes one process's step.

All of them, and `deferrable_linear` (a plain linear with its own backward, used while a
zero-bubble schedule builds its graph), hand their weight gradient to
`trident.parallel.tensor.weight_grad.defer` during a split backward's B: the input's
gradient is computed now, the weight's in the W (the sequence shard is re-gathered there,
so a B under sequence parallelism does no all-gather at all).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from trident.parallel.collectives import Group, all_gather_single, reduce_scatter_single
from trident.parallel.tensor.mappings import SEQ_DIM
from trident.parallel.tensor.weight_grad import defer
from trident.parallel.topology import group_rank, group_size


def _weight_grad(grad_y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dW = grad_y^T x over all tokens: [out, in]."""
    return grad_y.reshape(-1, grad_y.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))


def _gather_seq(shard: torch.Tensor, group: Group, async_op: bool):
    """All-gather the sequence dim into a new tensor; returns (gathered, work or None)."""
    n = group_size(group)
    src = shard.movedim(SEQ_DIM, 0).contiguous()  # [s/tp, b, h]
    out = torch.empty((n * src.shape[0],) + tuple(src.shape[1:]), dtype=src.dtype, device=src.device)
    work = all_gather_single(out, src, group=group, async_op=async_op)
    return out.movedim(0, SEQ_DIM), work  # [b, s, h] (a view of the [s, b, h] buffer)


class _GatheredLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard, weight, bias, group, deferrable):  # type: ignore[override]
        with record_function("sp_gather_forward"):  # the same gather, blocking: what overlap saves
            full, _ = _gather_seq(shard, group, async_op=False)
        ctx.group, ctx.has_bias = group, bias is not None
        ctx.save_for_backward(shard, weight)  # the shard, not the gather
        ctx.weight = weight if deferrable else None  # the tensor itself, for a deferred W (see `defer`)
        return F.linear(full, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        # the profiler spans (`trident bench memory --trace`) show what the re-gather exposes
        shard, weight = ctx.saved_tensors
        grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        if ctx.needs_input_grad[1] and ctx.weight is not None and defer(
            ctx.weight, lambda: _weight_grad(grad_y, _gather_seq(shard, ctx.group, False)[0]), (grad_y, shard)
        ):
            return _input_grad_scattered(grad_y, weight, ctx.group), None, grad_b, None, None
        full, gather = _gather_seq(shard, ctx.group, async_op=True)  # overlapped with the matmul below
        with record_function("sp_input_grad"):
            grad_full = grad_y.matmul(weight)  # [b, s, in]: needs only the weight
            grad_src = grad_full.movedim(SEQ_DIM, 0).contiguous()  # [s, b, in]
        grad_shard = grad_src.new_empty((grad_src.shape[0] // group_size(ctx.group),) + tuple(grad_src.shape[1:]))
        with record_function("sp_regather_wait"):  # exposed time of the re-gather
            gather.wait()
        scatter = reduce_scatter_single(grad_shard, grad_src, group=ctx.group, async_op=True)
        with record_function("sp_weight_grad"):  # under the reduce-scatter
            grad_w = _weight_grad(grad_y, full) if ctx.needs_input_grad[1] else None
        with record_function("sp_reduce_scatter_wait"):
            scatter.wait()
        return grad_shard.movedim(0, SEQ_DIM), grad_w, grad_b, None, None


def _input_grad_scattered(grad_y: torch.Tensor, weight: torch.Tensor, group: Group) -> torch.Tensor:
    """The input gradient alone (a split backward's B): matmul, then reduce-scatter."""
    grad_src = grad_y.matmul(weight).movedim(SEQ_DIM, 0).contiguous()  # [s, b, in]
    grad_shard = grad_src.new_empty((grad_src.shape[0] // group_size(group),) + tuple(grad_src.shape[1:]))
    reduce_scatter_single(grad_shard, grad_src, group=group)
    return grad_shard.movedim(0, SEQ_DIM)


class _DeferrableLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, seq_group):  # type: ignore[override]
        ctx.has_bias, ctx.seq_group = bias is not None, seq_group
        ctx.save_for_backward(x, weight)
        ctx.weight = weight  # the tensor itself, for a deferred W (see `defer`)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_x = grad_y.matmul(weight) if ctx.needs_input_grad[0] else None
        grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        kept, whole = _kept_output_grad(grad_y, ctx.seq_group)
        grad_w = None
        if ctx.needs_input_grad[1] and not defer(ctx.weight, lambda: _weight_grad(whole(), x), (kept, x)):
            grad_w = _weight_grad(grad_y, x)
        return grad_x, grad_w, grad_b, None


def deferrable_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, seq_group: Group | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` whose weight gradient a split backward can defer to its W.
    `seq_group`: the tp group when the output is reduce-scattered over the sequence next
    (a row-parallel linear under sequence parallelism; see `_kept_output_grad`)."""
    # x: [b, s, in]  ->  [b, s, out]
    return _DeferrableLinear.apply(x, weight, bias, seq_group)


def gathered_linear(
    shard: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group: Group, deferrable: bool = True
) -> torch.Tensor:
    """``F.linear(all_gather_seq(shard), weight, bias)``, saving only the shard for backward.

    Backward: the input's gradient is reduce-scattered back to sequence shards (every rank's
    full-sequence copy fed a different weight shard), as `gather_from_sp`'s would be.
    `deferrable=False` keeps the weight gradient in B even in a split backward (the output
    head: its W would keep a logits-sized output gradient until the W).
    """
    # shard: [b, s/tp, in]  ->  [b, s, out/tp]
    if group_size(group) == 1:
        return F.linear(shard, weight, bias)
    return _GatheredLinear.apply(shard, weight, bias, group, deferrable)


def _kept_output_grad(grad_y: torch.Tensor, seq_group: Group | None) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
    """What a deferred W keeps of a row-parallel linear's output gradient, and how it gets
    the whole back: under sequence parallelism the gradient arrives all-gathered ([b, s,
    h], not divided by tp), so only this rank's sequence shard is kept and the W
    all-gathers it again (every tp rank runs the same W at the same step)."""
    if seq_group is None or group_size(seq_group) == 1:
        return grad_y, lambda: grad_y
    n, rank = group_size(seq_group), group_rank(seq_group)
    part = grad_y.shape[SEQ_DIM] // n
    shard = grad_y.narrow(SEQ_DIM, rank * part, part).contiguous()  # [b, s/tp, h]
    return shard, lambda: _gather_seq(shard, seq_group, False)[0]


def _swiglu(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, silu(gate)): the second is reused by the backward."""
    # h: [..., 2f] (gate then up)  ->  [..., f]
    gate, up = h.chunk(2, dim=-1)
    silu_gate = F.silu(gate)
    return silu_gate * up, silu_gate


def _swiglu_backward(h: torch.Tensor, grad: torch.Tensor, silu_gate: torch.Tensor) -> torch.Tensor:
    """The gradient of h, written into one [..., 2f] tensor (no concatenation)."""
    gate, up = h.chunk(2, dim=-1)
    out = torch.empty_like(h)
    grad_gate, grad_up = out.chunk(2, dim=-1)
    torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
    torch.mul(grad, silu_gate, out=grad_up)
    return out


def _gelu(h: torch.Tensor) -> tuple[torch.Tensor, None]:
    return F.gelu(h, approximate="tanh"), None


def _gelu_backward(h: torch.Tensor, grad: torch.Tensor, _: None) -> torch.Tensor:
    return torch.ops.aten.gelu_backward(grad, h, approximate="tanh")


# name -> (forward: input -> (output, what the backward reuses), backward(input, grad of
# output, reused) -> grad of input): the same kernels autograd would run
ACTIVATIONS: dict[str, tuple[Callable, Callable]] = {
    "swiglu": (_swiglu, _swiglu_backward),
    "gelu": (_gelu, _gelu_backward),
}


class _ActivationLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, kind, seq_group):  # type: ignore[override]
        ctx.kind, ctx.weight, ctx.seq_group = kind, weight, seq_group  # the weight itself, for a deferred W
        ctx.save_for_backward(x, weight)  # not the activation's output: rebuilt in backward
        return F.linear(ACTIVATIONS[kind][0](x)[0], weight)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        act, act_backward = ACTIVATIONS[ctx.kind]
        out, reused = act(x)  # rebuilt
        kept, whole = _kept_output_grad(grad_y, ctx.seq_group)
        grad_w = None
        if ctx.needs_input_grad[1] and not defer(ctx.weight, lambda: _weight_grad(whole(), act(x)[0]), (kept, x)):
            grad_w = _weight_grad(grad_y, out)
        grad_x = act_backward(x, grad_y.matmul(weight), reused) if ctx.needs_input_grad[0] else None
        return grad_x, grad_w, None, None


def activation_linear(kind: str, x: torch.Tensor, weight: torch.Tensor, seq_group: Group | None = None) -> torch.Tensor:
    """``F.linear(act(x), weight)`` for an activation of `ACTIVATIONS`, keeping `x` (not
    ``act(x)``) for backward. `seq_group` as for `deferrable_linear`."""
    # x: [b, s, 2f] (swiglu) or [b, s, f] (gelu)  ->  [b, s, out]
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad):
        return F.linear(ACTIVATIONS[kind][0](x)[0], weight)
    return _ActivationLinear.apply(x, weight, kind, seq_group)
