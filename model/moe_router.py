"""The MoE router: which k experts each token goes to, with what weights, and the balancing losses.

Two scoring rules, as the models that use them define them:

* ``softmax`` (Mixtral): scores = softmax(logits); the top-k scores, renormalised to sum 1.
* ``sigmoid`` (DeepSeek-V3): scores = sigmoid(logits); the top-k scores, normalised to sum 1.

Load balancing, either or both:

* the Switch / Mixtral auxiliary loss ``E * sum_e f_e * P_e`` with f_e the share of the
  T*k assignments that went to expert e and P_e the mean score of e over the T tokens
  (scores normalised per token for the sigmoid rule, as Megatron-Core does); it is 1.0
  when the load is perfectly balanced, whatever E and k;
* the aux-loss-free bias of DeepSeek-V3: a per-expert bias added to the scores for the
  top-k *selection only* (the gate weights come from the unbiased scores), nudged after
  every optimizer step towards the mean load (`trident.model.moe.moe_step_end`).

The ST-MoE z-loss ``mean(logsumexp(logits)^2)`` keeps router logits small.

The router runs in fp32 whatever the model dtype: a bf16 softmax over experts would
round near-ties differently from step to step and make the selection jitter.

Under sequence parallelism each tp rank routes its own shard of the tokens, but the
losses are defined over the whole microbatch: the expert counts are summed over the tp
group (they carry no gradient) and each rank returns its share of the loss (its tokens'
part of a sum divided by the global token count), so the shares add up, over the ranks
and in the tp-partial gradient sum, to the single-process value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from trident.model.config import ModelConfig
from trident.parallel.collectives import all_reduce
from trident.parallel.tensor.sharding import Piece, mark_tp_partial_grad, set_pieces


@dataclass
class Routing:
    """One microbatch's routing decision on this rank (T = this rank's tokens)."""

    experts: torch.Tensor  # [T, k] int64: the chosen experts, best first
    gates: torch.Tensor  # [T, k] fp32: their weights (differentiable)
    counts: torch.Tensor  # [E] int64: assignments per expert among this rank's tokens
    aux: torch.Tensor  # []: this rank's share of the load-balancing loss (before its coefficient)
    z: torch.Tensor  # []: this rank's share of the z-loss (before its coefficient)


class Router(nn.Module):
    """A linear map hidden -> E logits (no bias), plus the DeepSeek-V3 selection bias buffer."""

    def __init__(self, cfg: ModelConfig, sp_group: dist.ProcessGroup | None, sp_size: int, device, dtype) -> None:
        super().__init__()
        e = cfg.moe_experts
        self.k, self.kind, self.use_bias = cfg.moe_top_k, cfg.moe_router, cfg.moe_bias_update_rate > 0
        self.sp_group, self.sp_size = sp_group, sp_size
        self.weight = nn.Parameter(torch.empty(e, cfg.hidden, device=device, dtype=dtype))
        set_pieces(self.weight, [Piece("weight", (e, cfg.hidden), 0, 0, e, 0, "normal", cfg.init_std, replicas=-1)])
        if sp_size > 1:  # each tp rank's gradient covers only its sequence shard
            mark_tp_partial_grad(self.weight)
        # fp32 whatever the model dtype; changed only by `moe_step_end`, never by the optimizer
        self.register_buffer("expert_bias", torch.zeros(e, device=device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> Routing:
        # x: [T, hidden]  (T = this rank's tokens of the microbatch)
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        scores = torch.softmax(logits, dim=-1) if self.kind == "softmax" else torch.sigmoid(logits)
        choose = scores + self.expert_bias if self.use_bias else scores
        experts = torch.topk(choose.detach(), self.k, dim=-1).indices  # [T, k]
        gates = scores.gather(1, experts)  # [T, k]
        gates = gates / gates.sum(dim=-1, keepdim=True)
        counts = torch.bincount(experts.reshape(-1), minlength=scores.shape[1])  # [E]
        aux, z = self._losses(logits, scores, counts)
        return Routing(experts, gates, counts, aux, z)

    def _losses(
        self, logits: torch.Tensor, scores: torch.Tensor, counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # logits, scores: [T, E]; counts: [E] -> (aux share [], z share [])
        n_experts = scores.shape[1]
        tokens = scores.shape[0] * self.sp_size  # the whole microbatch's tokens
        if self.sp_size > 1:
            counts = all_reduce(counts.clone(), self.sp_group)
        probs = scores if self.kind == "softmax" else scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
        share = counts.float() / (tokens * self.k)  # f_e, [E]
        aux = n_experts * (share * probs.sum(dim=0)).sum() / tokens
        z = torch.logsumexp(logits, dim=-1).square().sum() / tokens
        return aux, z

