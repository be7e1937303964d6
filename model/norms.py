"""Normalisation layers: RMSNorm and LayerNorm, with the sequence-parallel gradient flag.

A norm applied to a sequence shard (sequence parallelism) or to this rank's heads
(QK-norm under tp) sees only part of the data, so its weight's gradient is a partial sum
over tp: `make_norm` flags it where it is created, and the reductions read the flag.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trident.model.config import ModelConfig
from trident.parallel.tensor.sharding import mark_tp_partial_grad


class _RMSNormFn(torch.autograd.Function):
    """torch's fused RMSNorm kernels, keeping the input as given (the compute dtype) and the
    fp32 per-row rstd. Autograd of `F.rms_norm` keeps fp32 copies of the input and of the
    normalised input besides (8 bytes per element where this keeps 2 in bf16)."""

    @staticmethod
    def forward(ctx, x, weight, eps):  # type: ignore[override]
        y, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        # (torch 2.13 has no CPU kernel for _fused_rms_norm_backward: the same math in fp32)
        x, weight, rstd = ctx.saved_tensors
        g = grad_y.float()
        xhat = x.float() * rstd  # [..., dim]: rebuilt, not kept
        grad_w = (g * xhat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            dxhat = g * weight.float()
            grad_x = (rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_w, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., dim]  ->  same. Statistics in fp32 whatever the compute dtype.
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNormFn.apply(x, self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class _LayerNormFn(torch.autograd.Function):
    """LayerNorm computed in fp32, keeping the input in the compute dtype and the fp32
    per-row mean and rstd (autograd of an explicit upcast would keep the fp32 copy)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):  # type: ignore[override]
        bias32 = bias.float() if bias is not None else None
        y, mean, rstd = torch.native_layer_norm(x.float(), [x.shape[-1]], weight.float(), bias32, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x, weight, bias, mean, rstd = ctx.saved_tensors
        bias32 = bias.float() if bias is not None else None
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
            grad_y.float(), x.float(), [x.shape[-1]], mean, rstd, weight.float(), bias32, mask
        )
        cast = lambda g, like: g.to(like.dtype) if g is not None else None  # noqa: E731
        return cast(gx, x), cast(gw, weight), cast(gb, bias) if bias is not None else None, None


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, bias: bool, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(dim, device=device, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., dim]  ->  same, computed in fp32
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _LayerNormFn.apply(x, self.weight, self.bias, self.eps)
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
