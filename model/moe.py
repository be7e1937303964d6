"""The mixture-of-experts layer: route, permute tokens by expert, run the experts, un-permute.

    x [T, h] --router--> (experts [T, k], gates [T, k])
             --permute--> x_sorted [N, h], rows grouped by expert, counts [E]    (N = T*k, dropless)
             --experts--> y_sorted [N, h]    one grouped matmul per projection
             --unpermute-> y [T, h] = sum over the k choices of gate * expert output

Permute and un-permute are the seam where expert parallelism (`trident.parallel.expert`)
inserts its all-to-all: between them the layer only needs "rows sorted by expert, and how
many per expert", which is exactly what a dispatch hands to the ranks holding those
experts. Under ``parallel.ep`` a rank holds E/ep experts (ep rank r: experts r*E/ep ...),
marked `is_expert` so that their gradients are reduced over the dp/ep ranks that hold the
same experts; routing, the balancing losses and the shared experts are unchanged.

Experts are SwiGLU MLPs like the dense one, held stacked so that one
``torch._grouped_mm`` per projection computes all of them over the sorted rows (where the
build supports it for this device, dtype and shape: probed once at run time), else a loop
over the experts' contiguous row ranges. Both cost k/E of the dense E x work; nothing
computes every expert for every token.

Parameters and checkpoints. ``experts.gate_up`` is [E * 2f, h] (each expert's gate rows,
then its up rows) and ``experts.down`` is [E * h, f]; viewed as [E, 2f, h] and [E, h, f]
they feed the grouped matmul without a copy. Their `Piece`s name every expert's slice
globally, so initialisation, checkpoints, gathering and HF export see plain per-expert
tensors ``layers.N.mlp.experts.E.{gate,up,down}.weight``, the shapes of nn.Linear weights.

Tensor parallelism: experts are whole on every tp rank (expert_tp = 1). Without sequence
parallelism every tp rank holds the same tokens and computes the same routed output (the
routed part is replicated work, its gradients are whole on every rank); with sequence
parallelism each rank routes its own s/tp tokens, and the router and expert gradients are
tp-partial sums. Shared experts are an ordinary tensor-parallel SwiGLU MLP.

The balancing losses reach the backward pass through `_AddAuxGrad` at the layer output
(Megatron's MoEAuxLossAutoScaler), so they are part of whichever backward runs this layer
(any pipeline schedule, recomputation included) without travelling to the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trident.model.config import ModelConfig
from trident.model.moe_router import Router, Routing
from trident.parallel.collectives import all_reduce, comm_device
from trident.parallel.expert import dispatch as expert_dispatch
from trident.parallel.tensor.sharding import Piece, mark_expert, mark_tp_partial_grad, set_pieces
from trident.parallel.topology import Topology


# --- permutation ---------------------------------------------------------------------------
@dataclass
class Dispatch:
    """Where each kept (token, choice) went: rows of x_sorted are ``order`` of the T*k assignments."""

    order: torch.Tensor  # [N] int64: indices into the flattened [T*k] assignments, grouped by expert
    counts: torch.Tensor  # [E] int64: rows per expert in x_sorted (after any capacity drop)
    dropped: torch.Tensor  # [] int64: assignments dropped by the capacity limit


def permute(
    x: torch.Tensor, experts: torch.Tensor, n_experts: int, capacity: int | None = None
) -> tuple[torch.Tensor, Dispatch]:
    """Rows of `x` repeated once per choice and grouped by expert (stable: token order within one).

    With `capacity`, each expert keeps its first `capacity` assignments in token order
    (Switch's rule) and the rest are dropped: they contribute nothing to the output.
    """
    # x: [T, h]; experts: [T, k]  ->  x_sorted [N, h]
    k = experts.shape[1]
    flat = experts.reshape(-1)  # [T*k]
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts)  # [E]
    dropped = torch.zeros((), dtype=torch.int64, device=x.device)
    if capacity is not None:
        starts = torch.cumsum(counts, 0) - counts  # [E] first sorted row of each expert
        rank = torch.arange(flat.numel(), device=x.device) - starts[flat[order]]  # position within its expert
        order = order[rank < capacity]
        kept = counts.clamp(max=capacity)
        dropped, counts = (counts - kept).sum(), kept
    return x.index_select(0, order // k), Dispatch(order, counts, dropped)


def unpermute(y_sorted: torch.Tensor, dispatch: Dispatch, gates: torch.Tensor) -> torch.Tensor:
    """The inverse of `permute`, weighting each choice by its gate and summing the k choices.

    Dropped choices count zero. A fixed-order sum over k (no atomics), so it is deterministic.
    """
    # y_sorted: [N, h]; gates: [T, k]  ->  [T, h]
    t, k = gates.shape
    full = y_sorted.new_zeros(t * k, y_sorted.shape[1]).index_copy(0, dispatch.order, y_sorted)  # [T*k, h]
    return (full.view(t, k, -1) * gates.to(y_sorted.dtype).unsqueeze(-1)).sum(dim=1)


# --- experts -------------------------------------------------------------------------------
_GROUPED_OK: dict[tuple, bool] = {}


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, hidden: int, ffn: int) -> bool:
    """Whether ``torch._grouped_mm`` runs forward and backward here, in the layout the experts use.

    Probed once per (device type, dtype, shape) on tiny tensors: support depends on the
    build, the device (CUDA needs sm90+ for some dtypes) and 16-byte stride alignment.
    """
    key = (device.type, dtype, hidden, ffn)
    if key not in _GROUPED_OK:
        _GROUPED_OK[key] = _probe(device, dtype, hidden, ffn)
    return _GROUPED_OK[key]


def _probe(device: torch.device, dtype: torch.dtype, hidden: int, ffn: int) -> bool:
    if not hasattr(torch, "_grouped_mm") or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    try:
        with torch.enable_grad():
            x = torch.ones(8, hidden, device=device, dtype=dtype, requires_grad=True)
            w1 = torch.ones(2, 2 * ffn, hidden, device=device, dtype=dtype, requires_grad=True)
            w2 = torch.ones(2, hidden, ffn, device=device, dtype=dtype, requires_grad=True)
            offs = torch.tensor([3, 8], device=device, dtype=torch.int32)
            h = torch._grouped_mm(x, w1.transpose(1, 2), offs=offs)[:, :ffn]
            y = torch._grouped_mm(h.contiguous(), w2.transpose(1, 2), offs=offs)
            y.backward(torch.ones_like(y))
        return bool(torch.isfinite(w1.grad).all())
    except (RuntimeError, NotImplementedError, TypeError):
        return False


class Experts(nn.Module):
    """E SwiGLU experts of inner width f, stacked (see the module doc for the layout)."""

    def __init__(self, cfg: ModelConfig, partial_grad: bool, device, dtype, ep: int = 1, ep_rank: int = 0) -> None:
        super().__init__()
        e, h, f = cfg.moe_experts // ep, cfg.hidden, cfg.moe_ffn  # this rank's experts: first, first + 1, ...
        first = ep_rank * e
        self.n, self.h, self.f = e, h, f
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.gate_up = nn.Parameter(torch.empty(e * 2 * f, h, device=device, dtype=dtype))
        self.down = nn.Parameter(torch.empty(e * h, f, device=device, dtype=dtype))
        pieces = [Piece(f"{first + i}.{kind}.weight", (f, h), 0, 0, f, (2 * i + j) * f, "normal", cfg.init_std,
                        replicas=-1) for i in range(e) for j, kind in enumerate(("gate", "up"))]
        set_pieces(self.gate_up, pieces)
        set_pieces(self.down, [Piece(f"{first + i}.down.weight", (h, f), 0, 0, h, i * h, "normal", out_std,
                                     replicas=-1) for i in range(e)])
        for param in (self.gate_up, self.down):
            if partial_grad:
                mark_tp_partial_grad(param)
            if ep > 1:
                mark_expert(param)

    def forward(self, x: torch.Tensor, counts: torch.Tensor, grouped: bool | None = None) -> torch.Tensor:
        # x: [N, h] rows grouped by expert; counts: [E]  ->  [N, h]
        w1 = self.gate_up.view(self.n, 2 * self.f, self.h)  # [E, 2f, h]
        w2 = self.down.view(self.n, self.h, self.f)  # [E, h, f]
        if grouped is None:
            grouped = grouped_mm_supported(x.device, x.dtype, self.h, self.f)
        if grouped:
            offs = torch.cumsum(counts, 0).to(torch.int32)  # [E] end row of each expert
            gu = torch._grouped_mm(x, w1.transpose(1, 2), offs=offs)  # [N, 2f]
            gate, up = gu.split(self.f, dim=-1)
            return torch._grouped_mm((F.silu(gate) * up).contiguous(), w2.transpose(1, 2), offs=offs)  # [N, h]
        outs, start = [], 0
        for i, n in enumerate(counts.tolist()):  # one host sync: the loop needs the sizes
            if n:
                gate, up = F.linear(x[start : start + n], w1[i]).split(self.f, dim=-1)  # [n, f] each
                outs.append(F.linear(F.silu(gate) * up, w2[i]))  # [n, h]
            start += n
        return torch.cat(outs) if outs else x.new_zeros(0, self.h)


# --- the layer -----------------------------------------------------------------------------
class _AddAuxGrad(torch.autograd.Function):
    """Identity on the layer output whose backward also starts the balancing loss's backward
    with gradient `scale` (the weight the trainer gives one microbatch's loss)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale, ctx.loss_shape = scale, loss.shape
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, torch.full(ctx.loss_shape, ctx.scale, device=grad.device, dtype=torch.float32), None


class MoE(nn.Module):
    """Router + experts (+ shared experts): the MLP of an MoE block.

    `shared` is the always-on part (a tensor-parallel SwiGLU of width shared * moe_ffn, built
    by the block like its dense MLP) or None.
    """

    def __init__(
        self, cfg: ModelConfig, topo: Topology, layer: int, sp: bool, shared: nn.Module | None, device, dtype
    ) -> None:
        super().__init__()
        self.layer, self.sp, self.tp = layer, sp, topo.tp
        self.n_experts, self.k = cfg.moe_experts, cfg.moe_top_k
        self.capacity_factor = cfg.moe_capacity_factor
        self.aux_coef, self.z_coef = cfg.moe_aux_loss_coef, cfg.moe_z_loss_coef
        self.loss_scale = 1.0  # gradient of one microbatch's balancing loss; see `set_moe_loss_scale`
        sp_size = topo.tp if sp else 1
        self.router = Router(cfg, topo.tp_group if sp else None, sp_size, device, dtype)
        self.ep, self.ep_rank, self.ep_group = topo.ep, topo.ep_rank, topo.ep_group
        self.experts = Experts(cfg, sp, device, dtype, topo.ep, topo.ep_rank)
        self.shared = shared
        self.reset_stats()

    def reset_stats(self) -> None:
        """Sums over this step's microbatches, read (and reset) by `moe_step_end`."""
        self.stats: dict[str, torch.Tensor | float] = {}

    def capacity(self, tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * tokens * self.k / self.n_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [b, s(/tp), hidden]  ->  same
        flat = x.reshape(-1, x.shape[-1])  # [T, h]
        route: Routing = self.router(flat)
        x_sorted, dispatch = permute(flat, route.experts, self.n_experts, self.capacity(flat.shape[0]))  # [N, h]
        sent = 0
        if self.ep > 1:  # rows to the ranks of their experts, computed there, and back
            plan = expert_dispatch.plan(dispatch.counts, self.ep_group, self.ep)
            x_local = expert_dispatch.dispatch(x_sorted, plan, self.ep_group)  # [R, h] my experts' rows
            y_sorted = expert_dispatch.combine(self.experts(x_local, plan.local_counts), plan, self.ep_group)
            sent = plan.bytes_sent(self.ep_rank, x_sorted.shape[1] * x_sorted.element_size())
        else:
            y_sorted = self.experts(x_sorted, dispatch.counts)  # [N, h]
        y = unpermute(y_sorted, dispatch, route.gates).view_as(x)  # [b, s(/tp), h]
        if self.shared is not None:
            y = y + self.shared(x)
        if self.training:
            self._record(route, dispatch, flat.shape[0], sent)
        if self.training and torch.is_grad_enabled() and (self.aux_coef > 0 or self.z_coef > 0):
            loss = self.aux_coef * route.aux + self.z_coef * route.z  # []
            y = _AddAuxGrad.apply(y, loss, self.loss_scale)
        return y

    def _record(self, route: Routing, dispatch: Dispatch, tokens: int, sent: int) -> None:
        """Add this microbatch to the step's statistics (device tensors: no host sync), once:
        not again when full recomputation reruns the layer inside the backward pass."""
        if torch._C._current_graph_task_id() != -1:
            return
        share = 1.0 / self.tp if self.sp else 1.0  # sp: each tp rank holds 1/tp of a microbatch
        new = {"counts": route.counts, "aux": route.aux.detach().double(), "z": route.z.detach().double(),
               "dropped": dispatch.dropped, "tokens": float(tokens * self.k), "micro": share,
               "a2a_bytes": float(sent)}
        for key, value in new.items():
            self.stats[key] = self.stats.get(key, 0) + value


def moe_layers(model: nn.Module) -> list[MoE]:
    return sorted((m for m in model.modules() if isinstance(m, MoE)), key=lambda m: m.layer)


def set_moe_loss_scale(model: nn.Module, scale: float) -> None:
    """Weight of each microbatch's balancing loss in the backward pass: the trainer passes
    ``loss_scale / (microbatches x dp)``, so the step minimises the mean over the global
    batch's microbatches (as the token loss is its global mean); 1.0 by default."""
    for layer in moe_layers(model):
        layer.loss_scale = scale


@torch.no_grad()
def moe_step_end(model: nn.Module, cfg: ModelConfig, topo: Topology, update_bias: bool = True) -> dict[str, float]:
    """After a training step: the step's MoE metrics on every rank, and the selection-bias update.

    Every rank calls this (it is collective: one all-reduce over dp, one over pp, one over tp
    under sequence parallelism, each of n_layers x (E + 6) numbers). The expert loads are
    summed over the whole global batch before the bias moves, so the bias, like the
    weights, is the same at every layout. Returns {} for a dense model.
    """
    if cfg.moe_experts == 0:
        return {}
    e, mine = cfg.moe_experts, moe_layers(model)
    table = torch.zeros(cfg.n_layers, e + 6, dtype=torch.float64)  # counts | aux z dropped tokens micro a2a_bytes
    for layer in mine:
        s = layer.stats
        if s:
            table[layer.layer, :e] = s["counts"].double().cpu()
            table[layer.layer, e:] = torch.tensor([float(s["aux"]), float(s["z"]), float(s["dropped"]),
                                                   s["tokens"], s["micro"], s["a2a_bytes"]], dtype=torch.float64)
        layer.reset_stats()
    table = table.to(comm_device(topo))
    if getattr(model, "sp", False):  # tp ranks hold different tokens (only this stage's rows are filled yet)
        all_reduce(table, topo.tp_group)
    all_reduce(table, topo.dp_group)
    all_reduce(table, topo.pp_group)
    table = table.cpu()
    rate = cfg.moe_bias_update_rate
    if update_bias and rate > 0:
        for layer in mine:
            load = table[layer.layer, :e]
            bias = layer.router.expert_bias
            bias += (rate * torch.sign(load.mean() - load)).to(bias.device, bias.dtype)
    out = _metrics(cfg, table)
    if topo.ep > 1 and out:  # all-to-all bytes sent between ranks, per rank: forward, and as much in backward
        ranks = topo.dp * topo.pp * (topo.tp if getattr(model, "sp", False) else 1)
        out["moe_a2a_bytes"] = 2 * float(table[:, e + 5].sum()) / ranks
    return out


def _metrics(cfg: ModelConfig, table: torch.Tensor) -> dict[str, float]:
    e = cfg.moe_experts
    rows = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i) and table[i, e + 4] > 0]
    if not rows:
        return {}
    out: dict[str, float] = {}
    aux = z = dropped = tokens = 0.0
    cvs = []
    for i in rows:
        load, (a, zz, d, t, m, _) = table[i, :e], table[i, e:].tolist()
        aux, z, dropped, tokens = aux + a / m, z + zz / m, dropped + d, tokens + t
        cv = float(load.std(unbiased=False) / load.mean().clamp_min(1e-12))
        cvs.append(cv)
        out.update({f"moe_load_min.{i}": float(load.min()), f"moe_load_max.{i}": float(load.max()),
                    f"moe_load_cv.{i}": cv})
    out.update({"moe_aux_loss": cfg.moe_aux_loss_coef * aux, "moe_balance": aux / len(rows),
                "moe_z_loss": cfg.moe_z_loss_coef * z, "moe_load_cv": max(cvs), "moe_dropped": dropped / tokens})
    return out


@torch.no_grad()
def expert_bias_state(model: nn.Module, cfg: ModelConfig, topo: Topology) -> dict[str, list[float]]:
    """Every MoE layer's selection bias by global name (``layers.N.mlp.router.expert_bias``), on
    every rank: n_layers x E numbers, small enough for a checkpoint's JSON metadata (fp32 values
    survive the round trip through JSON exactly). Collective over pp; {} when there is no bias."""
    if cfg.moe_experts == 0 or cfg.moe_bias_update_rate == 0:
        return {}
    table = torch.zeros(cfg.n_layers, cfg.moe_experts, dtype=torch.float64)
    for layer in moe_layers(model):
        table[layer.layer] = layer.router.expert_bias.double().cpu()
    table = all_reduce(table.to(comm_device(topo)), topo.pp_group).cpu()  # tp and dp ranks hold the same bias
    return {f"layers.{i}.mlp.router.expert_bias": table[i].tolist() for i in range(cfg.n_layers) if cfg.is_moe_layer(i)}


@torch.no_grad()
def load_expert_bias(model: nn.Module, saved: dict[str, list[float]]) -> None:
    """Put back what `expert_bias_state` returned (at any layout: the names are global)."""
    for layer in moe_layers(model):
        values = saved.get(f"layers.{layer.layer}.mlp.router.expert_bias")
        if values is not None:
            layer.router.expert_bias.copy_(torch.tensor(values, dtype=torch.float64))
