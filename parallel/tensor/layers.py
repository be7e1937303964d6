"""Tensor-parallel layers: column- and row-parallel linears and the vocabulary-parallel embedding.

Each layer holds only its shard and records, through `Piece`s, which slices of which
global tensors that shard is. Communication goes through `trident.parallel.tensor.mappings`.

With sequence parallelism the activations between layers are ``[batch, seq/tp, hidden]``:
a column-parallel linear all-gathers the sequence on the way in, a row-parallel linear
reduce-scatters it on the way out, and parameters used on sequence shards (norms, the
row-parallel bias, learned positions) are flagged so their gradients are summed over tp
(`sync_tp_partial_grads`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trident.parallel.collectives import all_reduce, all_reduce_coalesced
from trident.parallel.tensor.lean_linear import activation_linear, deferrable_linear, gathered_linear
from trident.parallel.tensor.mappings import (
    copy_to_tp,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sp,
    scatter_to_tp,
)
from trident.parallel.tensor.sharding import Piece, is_tp_partial, mark_tp_partial_grad, reduction_grad, set_pieces
from trident.parallel.tensor.weight_grad import splitting
from trident.parallel.topology import Topology


@dataclass(frozen=True)
class Block:
    """A run of output rows of a column-parallel linear: rows [start, start+length) of the
    global tensor `name` (e.g. "q"), which has `size` rows. `grad_group`, when set, is the
    group of ranks that hold the same rows (a replicated kv head) and must sum its gradient."""

    name: str
    size: int
    start: int
    length: int
    grad_group: object = None
    replicas: int = 1  # ranks holding the same rows (the size of grad_group)


def sync_tp_partial_grads(module: nn.Module, topo: Topology) -> None:
    """Sum over tp the gradients of parameters flagged by `mark_tp_partial_grad`.

    Called once after the backward passes of a step (before any data-parallel reduction),
    like Megatron's finalize step, rather than once per microbatch.
    """
    if topo.tp == 1:
        return
    grads = [reduction_grad(p) for p in module.parameters() if is_tp_partial(p)]
    all_reduce_coalesced([g for g in grads if g is not None], topo.tp_group)


class _SumReplicaGrads(torch.autograd.Function):
    """Identity forward; backward sums the gradient of each replicated row block
    ``(offset, length, group)`` over that block's group (the ranks sharing a kv head)."""

    @staticmethod
    def forward(ctx, t, groups):  # type: ignore[override]
        ctx.groups = groups
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad = grad.contiguous().clone()  # never reduce in place a gradient autograd may share
        for offset, length, group in ctx.groups:
            all_reduce(grad[offset : offset + length], group)
        return grad, None


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split over tp: each rank produces its slice of y.

    `out` is either the global number of output features (split evenly) or a list of
    `Block`s for fused projections (QKV, gate+up), so each rank gets matching sub-blocks
    of every fused tensor.
    """

    def __init__(
        self,
        in_features: int,
        out: int | list[Block],
        topo: Topology,
        bias: bool = True,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        std: float = 0.02,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(out, int):
            if out % topo.tp != 0:
                raise ValueError(f"output features {out} do not divide by tp={topo.tp}")
            local = out // topo.tp
            out = [Block("", out, topo.tp_rank * local, local)]
        self.blocks = out
        self.group = topo.tp_group
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel and topo.tp > 1
        out_local = sum(b.length for b in out)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_local, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_local, **kw)) if bias else None
        w_pieces, b_pieces, offset = [], [], 0
        for b in out:
            wname = f"{b.name}.weight" if b.name else "weight"
            bname = f"{b.name}.bias" if b.name else "bias"
            w_pieces.append(Piece(wname, (b.size, in_features), 0, b.start, b.length, offset, "normal", std, b.replicas))
            b_pieces.append(Piece(bname, (b.size,), 0, b.start, b.length, offset, "zeros", replicas=b.replicas))
            offset += b.length
        set_pieces(self.weight, w_pieces)
        if self.bias is not None:
            set_pieces(self.bias, b_pieces)

    def _shared(self, t: torch.Tensor) -> torch.Tensor:
        """A view of `t` whose gradient, for each replicated block, is summed over the ranks
        that hold it (no copy of the weight is made, so none is kept for backward)."""
        groups = [(offset, b.length, b.grad_group) for offset, b in zip(self._offsets(), self.blocks)
                  if b.grad_group is not None]
        return _SumReplicaGrads.apply(t, groups) if groups else t

    def _offsets(self) -> list[int]:
        starts, offset = [], 0
        for b in self.blocks:
            starts.append(offset)
            offset += b.length
        return starts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [batch, seq (/tp if sequence parallel), in]  ->  y: [batch, seq, out/tp]
        weight = self._shared(self.weight)
        bias = self._shared(self.bias) if self.bias is not None else None
        if self.sequence_parallel:  # gathers the sequence; keeps only this rank's shard for backward
            y = gathered_linear(x, weight, bias, self.group)
        else:
            y = (deferrable_linear if splitting() else F.linear)(copy_to_tp(x, self.group), weight, bias)
        if self.gather_output:
            y = gather_from_tp(y, self.group)
        return y


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns split over tp; partial products are summed.

    The bias is added once, after the reduction (adding it per rank would count it tp times).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        topo: Topology,
        bias: bool = True,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        std: float = 0.02,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_features % topo.tp != 0:
            raise ValueError(f"input features {in_features} do not divide by tp={topo.tp}")
        local = in_features // topo.tp
        self.group = topo.tp_group
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel and topo.tp > 1
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, local, **kw))
        set_pieces(
            self.weight,
            [Piece("weight", (out_features, in_features), 1, topo.tp_rank * local, local, 0, "normal", std)],
        )
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        if self.bias is not None:
            set_pieces(self.bias, [Piece("bias", (out_features,), 0, 0, out_features, 0, "zeros", replicas=-1)])
            if self.sequence_parallel:
                mark_tp_partial_grad(self.bias)

    def forward(self, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        """`activation` (a name in `lean_linear.ACTIVATIONS`), when given, is applied to `x`
        first and rebuilt in backward rather than kept: the MLP passes its SwiGLU / GeLU here."""
        # x: [batch, seq, in/tp] (or [batch, seq, 2*in/tp] before SwiGLU)  ->  y: [batch, seq (/tp if sp), out]
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.group)
        seq_group = self.group if self.sequence_parallel else None  # a deferred W keeps its shard of dY
        if activation is not None:
            y = activation_linear(activation, x, self.weight, seq_group)
        else:
            y = deferrable_linear(x, self.weight, None, seq_group) if splitting() else F.linear(x, self.weight)
        y = reduce_scatter_to_sp(y, self.group) if self.sequence_parallel else reduce_from_tp(y, self.group)
        return y + self.bias if self.bias is not None else y


def padded_vocab_size(vocab_size: int, multiple: int, tp: int) -> int:
    """Vocabulary rounded up to a multiple of `multiple * tp` (Megatron's padding rule)."""
    step = multiple * tp
    return -(-vocab_size // step) * step


class VocabParallelEmbedding(nn.Module):
    """Embedding whose (padded) vocabulary rows are split over tp.

    Each rank looks up the ids that fall in its row range and contributes zeros for the
    rest; the sum over tp (or reduce-scatter over the sequence) is the full embedding.
    Padding rows belong to no global tensor: they start at zero, are never looked up, and
    the cross-entropy masks them so they never win a softmax.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden: int,
        topo: Topology,
        pad_multiple: int = 128,
        sequence_parallel: bool = False,
        std: float = 0.02,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.padded_size = padded_vocab_size(vocab_size, pad_multiple, topo.tp)
        self.local_size = self.padded_size // topo.tp
        self.vocab_start = topo.tp_rank * self.local_size
        self.vocab_end = self.vocab_start + self.local_size
        self.group = topo.tp_group
        self.sequence_parallel = sequence_parallel and topo.tp > 1
        self.weight = nn.Parameter(torch.empty(self.local_size, hidden, device=device, dtype=dtype))
        # a rank whose rows are all padding still names the global tensor (an empty slice)
        real = max(0, min(self.vocab_end, vocab_size) - self.vocab_start)
        start = min(self.vocab_start, vocab_size)
        set_pieces(self.weight, [Piece("weight", (vocab_size, hidden), 0, start, real, 0, "normal", std)])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: [batch, seq]  ->  [batch, seq (/tp if sequence parallel), hidden]
        if self.local_size == self.padded_size:  # one rank holds every row: a plain lookup
            return F.embedding(tokens, self.weight)
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
        local = (tokens - self.vocab_start).masked_fill(outside, 0)
        emb = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sp(emb, self.group)
        return reduce_from_tp(emb, self.group)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for this rank's vocabulary rows: the output head (tied or not) is an
        embedding table used the other way round.

        When one rank holds every row the padding rows are left out of the matmul: the
        logits come out exactly ``vocab`` wide, so the loss needs no slice of them (whose
        backward would zero-fill and copy a logits-sized tensor every step)."""
        # x: [batch, seq (/tp if sequence parallel), hidden]  ->  [batch, seq, padded_vocab/tp] (tp > 1)
        #                                                       or [batch, seq, vocab] (tp = 1)
        if self.sequence_parallel:
            return gathered_linear(x, self.weight, None, self.group, deferrable=False)
        x = copy_to_tp(x, self.group)
        if self.local_size == self.padded_size and self.padded_size > self.vocab_size:
            return F.linear(x, self.weight[: self.vocab_size])
        return F.linear(x, self.weight)
