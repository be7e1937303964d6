"""Cross-entropy over vocabulary-parallel logits, without ever gathering the full vocabulary.

Each rank holds logits for its slice of the (padded) vocabulary. Three all-reduces of
``[tokens]``-sized tensors replace the gather of ``[tokens, vocab]``: the max (for a stable
exponent), the target's logit (only one rank holds it), and the sum of exponentials.
With label smoothing the mean logit over the real vocabulary rides in the same all-reduce
as the target logit, so it costs nothing extra.

Columns at or beyond the real vocabulary size are padding: they are set to -inf, so they
neither win the max nor add to the partition function, whatever tp (and so padding) is.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trident.parallel.collectives import all_reduce
from trident.parallel.topology import group_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_size, group, label_smoothing):
        # logits: [..., vocab_local] (this rank's columns); target: [...] global ids
        z = logits.float()
        local = z.shape[-1]
        real = max(0, min(vocab_size - vocab_start, local))
        if real < local:
            z = z.clone()
            z[..., real:] = float("-inf")
        z_max = z.max(dim=-1).values
        all_reduce(z_max, group, op=dist.ReduceOp.MAX)
        z = z - z_max.unsqueeze(-1)

        in_range = (target >= vocab_start) & (target < vocab_start + real)
        local_target = (target - vocab_start).masked_fill(~in_range, 0)
        picked = z.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(~in_range, 0.0)
        # one all-reduce for the target logit and (when smoothing) the sum of real logits
        if label_smoothing > 0:
            stacked = torch.stack([picked, z[..., :real].sum(dim=-1) if real else torch.zeros_like(picked)])
            all_reduce(stacked, group)
            picked, z_sum = stacked[0], stacked[1]
        else:
            all_reduce(picked, group)
        exp = z.exp()
        sum_exp = exp.sum(dim=-1)
        all_reduce(sum_exp, group)
        log_z = sum_exp.log()
        loss = log_z - picked
        if label_smoothing > 0:
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (log_z - z_sum / vocab_size)

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, in_range)
        ctx.real, ctx.eps, ctx.vocab_size, ctx.dtype = real, label_smoothing, vocab_size, logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, in_range = ctx.saved_tensors
        grad = softmax  # d loss / d z = softmax - (1-eps) onehot - eps/V on real columns
        grad.scatter_add_(
            -1, local_target.unsqueeze(-1), -(1.0 - ctx.eps) * in_range.unsqueeze(-1).to(grad.dtype)
        )
        if ctx.eps > 0 and ctx.real:
            grad[..., : ctx.real] -= ctx.eps / ctx.vocab_size
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    vocab_start: int,
    vocab_size: int,
    group: dist.ProcessGroup | None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-token loss ``[...]`` from this rank's logit columns ``[..., vocab_local]``.

    `vocab_start` is the global id of this rank's first column and `vocab_size` the real
    (unpadded) vocabulary. Every rank of `group` returns the same full loss.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if group_size(group) == 1:
        # one rank holds the whole vocabulary: torch's fused log-softmax kernel is the same
        # math (its label smoothing is the same mix of nll and mean -log p) and faster
        z = logits if logits.shape[-1] == vocab_size else logits[..., :vocab_size]  # [..., vocab]
        z = z.float()
        loss = F.cross_entropy(z.flatten(0, -2), target.flatten(), reduction="none", label_smoothing=label_smoothing)
        return loss.view(target.shape)
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, vocab_size, group, label_smoothing)
