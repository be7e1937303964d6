"""A plain single-process PyTorch model of the same architecture, for benchmarks and checks.

This is the model a careful engineer writes without a parallel engine in mind (the shape
of Hugging Face's Llama and nanoGPT): separate q/k/v and gate/up projections, rotate-half
RoPE, `repeat_interleave` for grouped-query attention, SDPA, a dense vocabulary head and
`F.cross_entropy`. `trident bench train` times a training step of it next to trident's
at the same config, and the tests load trident's weights into it to check that the two
really are the same function (so the speed ratio compares like with like).

Supports what both GPT-2 and Llama express: RMSNorm/LayerNorm (pre or post), RoPE or
learned positions, SwiGLU or GeLU, biases, tied or untied embeddings, GQA. ALiBi and
QK-norm are refused with a `UserError` naming the feature, and so is a mixture of experts
(its dense MLP would silently compare another model).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trident.errors import UserError
from trident.model.config import ModelConfig


def check_supported(cfg: ModelConfig) -> None:
    """Raise a `UserError` naming the first feature the reference model does not implement."""
    if cfg.position not in ("rope", "learned"):
        raise UserError(f"the plain reference model has no {cfg.position!r} positions; it supports rope and learned")
    if cfg.qk_norm:
        raise UserError("the plain reference model has no qk_norm; set model.qk_norm=false to compare")
    if cfg.moe_experts > 0:
        raise UserError(f"the plain reference model has no mixture of experts (model.moe_experts={cfg.moe_experts}); "
                        "it compares dense models only")


def _norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps, bias=cfg.bias)


class ReferenceBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hd, kv = cfg.head_dim, cfg.kv_heads
        self.cfg = cfg
        self.norm1, self.norm2 = _norm(cfg), _norm(cfg)
        self.q = nn.Linear(cfg.hidden, cfg.n_heads * hd, bias=cfg.bias)
        self.k = nn.Linear(cfg.hidden, kv * hd, bias=cfg.bias)
        self.v = nn.Linear(cfg.hidden, kv * hd, bias=cfg.bias)
        self.o = nn.Linear(cfg.n_heads * hd, cfg.hidden, bias=cfg.bias)
        if cfg.activation == "swiglu":
            self.gate = nn.Linear(cfg.hidden, cfg.ffn, bias=cfg.bias)
        self.up = nn.Linear(cfg.hidden, cfg.ffn, bias=cfg.bias)
        self.down = nn.Linear(cfg.ffn, cfg.hidden, bias=cfg.bias)

    def attention(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
        # x: [b, s, hidden]  ->  [b, s, hidden]
        b, s, _ = x.shape
        cfg, hd = self.cfg, self.cfg.head_dim
        q = self.q(x).view(b, s, cfg.n_heads, hd).transpose(1, 2)  # [b, heads, s, hd]
        k = self.k(x).view(b, s, cfg.kv_heads, hd).transpose(1, 2)  # [b, kv, s, hd]
        v = self.v(x).view(b, s, cfg.kv_heads, hd).transpose(1, 2)
        if cos is not None:
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        if cfg.kv_heads != cfg.n_heads:
            k = k.repeat_interleave(cfg.n_heads // cfg.kv_heads, dim=1)
            v = v.repeat_interleave(cfg.n_heads // cfg.kv_heads, dim=1)
        p = cfg.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # [b, heads, s, hd]
        return self.o(out.transpose(1, 2).reshape(b, s, cfg.n_heads * hd))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        # x: [b, s, hidden]  ->  [b, s, hidden]
        if self.cfg.activation == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate="tanh"))

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
        # x: [b, s, hidden]  ->  [b, s, hidden]
        drop = lambda t: F.dropout(t, self.cfg.dropout, self.training)  # noqa: E731
        if self.cfg.norm_position == "pre":
            x = x + drop(self.attention(self.norm1(x), cos, sin))
            return x + drop(self.mlp(self.norm2(x)))
        x = self.norm1(x + drop(self.attention(x, cos, sin)))
        return self.norm2(x + drop(self.mlp(x)))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [b, heads, s, hd]; cos, sin: [s, hd]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class ReferenceGPT(nn.Module):
    """The whole model in one process; ``forward(tokens, labels)`` is the mean token loss."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        check_supported(cfg)
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.hidden)
        if cfg.position == "learned":
            self.pos_embedding = nn.Parameter(torch.zeros(cfg.max_seq_len, cfg.hidden))
        self.blocks = nn.ModuleList(ReferenceBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = _norm(cfg)
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embedding.weight
        self._init()
        if cfg.position == "rope":
            half = cfg.head_dim // 2
            inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, half, dtype=torch.float64) / half))
            ang = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), inv).repeat(1, 2)
            self.register_buffer("cos", ang.cos().float(), persistent=False)
            self.register_buffer("sin", ang.sin().float(), persistent=False)

    def _init(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            scale = math.sqrt(2 * self.cfg.n_layers) if name.endswith(("o.weight", "down.weight")) else 1.0
            nn.init.normal_(p, std=std / scale)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        # tokens, labels: [b, s]  ->  loss [] (labels given) or logits [b, s, vocab]
        s = tokens.shape[1]
        x = self.embedding(tokens)  # [b, s, hidden]
        cos = sin = None
        if self.cfg.position == "learned":
            x = x + self.pos_embedding[:s]
        else:
            cos, sin = self.cos[:s].to(x.dtype), self.sin[:s].to(x.dtype)
        x = F.dropout(x, self.cfg.dropout, self.training)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.head(self.final_norm(x))  # [b, s, vocab]
        if labels is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

    @torch.no_grad()
    def load_trident(self, full: dict[str, torch.Tensor]) -> None:
        """Copy weights from trident's global tensors (`trident.parallel.tensor.sharding.gather_full`)."""
        cfg = self.cfg
        mine = dict(self.named_parameters())

        def put(name: str, value: torch.Tensor) -> None:
            mine[name].copy_(value[: mine[name].shape[0]] if name in ("embedding.weight", "head.weight") else value)

        put("embedding.weight", full["embedding.weight"])
        if cfg.position == "learned":
            put("pos_embedding", full["pos_embedding"])
        put("final_norm.weight", full["final_norm.weight"])
        if "final_norm.bias" in full:
            put("final_norm.bias", full["final_norm.bias"])
        if not cfg.tie_embeddings:
            put("head.weight", full["head.weight"])
        pairs = {"norm1": "norm1", "norm2": "norm2", "q": "attn.qkv.q", "k": "attn.qkv.k", "v": "attn.qkv.v",
                 "o": "attn.proj", "down": "mlp.proj"}
        pairs.update({"gate": "mlp.fc.gate", "up": "mlp.fc.up"} if cfg.activation == "swiglu" else {"up": "mlp.fc"})
        for i in range(cfg.n_layers):
            for ours, theirs in pairs.items():
                for kind in ("weight", "bias"):
                    src = f"layers.{i}.{theirs}.{kind}"
                    if src in full:
                        put(f"blocks.{i}.{ours}.{kind}", full[src])
