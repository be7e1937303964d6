"""Choosing the next token from logits, the same way on every tensor-parallel rank.

Each step's full-vocabulary logits are turned into a token on the CPU, in fp32, with one
seeded generator: greedy takes the argmax; sampling divides by the temperature, keeps
the `top_k` best and the smallest set whose probability reaches `top_p`, and draws.
Under tensor parallelism every rank holds the same gathered logits and the same
generator, and the chosen tokens are still broadcast from the first tp rank (`agree`),
so the ranks cannot drift apart and leave one waiting in a collective.

This is kept apart from the decoding loops (`trident.inference.generate`,
`trident.inference.speculative`) because both loops choose tokens the same way, and the
distribution `probabilities` builds is what speculative sampling's acceptance test
compares.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trident.errors import UserError
from trident.parallel.collectives import comm_device
from trident.parallel.topology import Topology


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    """Tokens to generate at most (fewer when an end-of-document token or the context ends it)."""
    temperature: float = 1.0
    """Divides the logits before sampling; 0 means greedy."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 = no limit."""
    top_p: float = 1.0
    """Sample among the smallest set of tokens whose probability reaches p (nucleus); 1 = no limit."""
    greedy: bool = False
    """Always take the most likely token (deterministic; ignores temperature, top-k, top-p)."""
    seed: int | None = None
    """Seed of the sampling generator; None draws one (and all tp ranks share it)."""
    stop_at_eod: bool = True
    """Stop at the tokenizer's end-of-document token (which is not part of the output)."""
    draft_tokens: int = 4
    """Speculative decoding: tokens the draft model proposes per target forward."""

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0

    def validate(self) -> "SamplingConfig":
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.draft_tokens < 1:
            raise UserError(f"--draft-tokens must be >= 1, got {self.draft_tokens}")
        return self


def probabilities(logits: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
    """Sampling distribution after temperature, top-k and top-p."""
    # logits: [n, vocab] fp32  ->  probabilities [n, vocab]
    logits = logits / s.temperature
    vocab = logits.shape[-1]
    if 0 < s.top_k < vocab:
        kth = torch.topk(logits, s.top_k, dim=-1).values[..., -1:]  # [n, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked before it already reach top_p (the first stays)
        drop_sorted = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= s.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)


def draw(probs: torch.Tensor, gen: torch.Generator) -> int:
    """One token drawn from `probs`."""
    # probs: [vocab]
    return int(torch.multinomial(probs, 1, generator=gen).item())


def choose(logits: torch.Tensor, s: SamplingConfig, gen: torch.Generator) -> int:
    """The next token: the argmax when greedy, else a draw from `probabilities`."""
    # logits: [vocab]
    if s.is_greedy:
        return int(torch.argmax(logits).item())
    return draw(probabilities(logits[None], s)[0], gen)


def agree(values: list[int], topo: Topology) -> list[int]:
    """The first tp rank's `values` on every rank (a no-op in one process)."""
    if topo.tp == 1 or topo.tp_group is None:
        return values
    device = comm_device(topo)
    src = topo.rank - topo.tp_rank  # tp ranks are consecutive: the group's first global rank
    n = torch.tensor([len(values)], dtype=torch.long, device=device)
    dist.broadcast(n, src=src, group=topo.tp_group)
    t = torch.tensor(values if topo.tp_rank == 0 else [0] * int(n.item()), dtype=torch.long, device=device)
    dist.broadcast(t, src=src, group=topo.tp_group)
    return [int(v) for v in t.cpu().tolist()]


def sampling_generator(s: SamplingConfig, topo: Topology) -> torch.Generator:
    """The seeded generator every tp rank draws from alike (one seed, even when drawn at random)."""
    seed = s.seed if s.seed is not None else int.from_bytes(os.urandom(7), "little")
    seed = agree([seed], topo)[0]  # one stream on every tp rank, even when drawn at random
    return torch.Generator().manual_seed(seed)
