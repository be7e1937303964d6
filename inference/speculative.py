"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model
proposes, the target model verifies several tokens in one forward.

The draft proposes `draft_tokens` tokens one at a time, the target scores all of them in
one forward, and the longest acceptable prefix is kept plus one token from the target.
Greedy acceptance keeps a proposal when it equals the target's argmax, so the output is
the target's own greedy output; with sampling a proposal is accepted with probability
min(1, p/q) and a rejection draws from max(0, p - q), which leaves the output distributed
exactly as the target's. Both caches are then rewound to the kept prefix. The acceptance
rate (accepted / proposed) measures how well the draft predicts the target.

Its own module because the acceptance rules are the part that needs a proof to read;
the loop around them reuses the plain decoder's pieces (`trident.inference.decoding`).
"""

from __future__ import annotations

import time

import torch

from trident.errors import UserError
from trident.inference.decoding import GenerationResult, Runner, check_prompt, context_length, finish
from trident.inference.sampling import SamplingConfig, agree, draw, probabilities, sampling_generator
from trident.model.gpt import GPT


def speculative_generate(
    target: GPT,
    draft: GPT,
    prompt_ids: list[int],
    s: SamplingConfig,
    eod_id: int | None = None,
) -> GenerationResult:
    """Continue `prompt_ids` with `draft` proposing and `target` verifying (see the module
    docstring); greedy output equals `generate(target, ...)`'s."""
    check_prompt(prompt_ids, s)
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise UserError(
            f"the draft model's vocabulary ({draft.cfg.vocab_size}) differs from the target's ({target.cfg.vocab_size}); "
            "the draft must share the target's tokenizer"
        )
    topo = target.topo
    limit = min(context_length(target.cfg, len(prompt_ids), s), context_length(draft.cfg, len(prompt_ids), s))
    big, small = Runner(target, limit, True), Runner(draft, limit, True)
    gen = sampling_generator(s, topo)
    tokens = list(prompt_ids)
    proposed = accepted_total = 0
    start = time.perf_counter()
    while True:
        room = min(s.max_new_tokens - (len(tokens) - len(prompt_ids)), limit - len(tokens))
        k = min(s.draft_tokens, room - 1)  # the target always adds one token of its own
        proposals, q_rows = _propose(small, tokens, k, s, gen)
        proposals = agree(proposals, topo)  # the target's ranks must score the same tokens
        rows = big.logits(tokens + proposals, last=k + 1)  # [k + 1, vocab]: row i predicts after proposal i
        if s.is_greedy:
            accepted, nxt = accept_greedy(rows, proposals)
        else:
            accepted, nxt = accept_sampled(probabilities(rows, s), q_rows, proposals, gen)
        kept = agree(proposals[:accepted] + [nxt], topo)
        proposed += k
        accepted_total += len(kept) - 1
        tokens += kept
        big.rewind(len(tokens) - 1)  # keep only the positions of tokens that stayed
        small.rewind(len(tokens) - 1)
        new, stopped = finish(tokens, len(prompt_ids), s, eod_id, limit)
        if stopped is not None:
            break
    return GenerationResult(
        list(prompt_ids), new, stopped, time.perf_counter() - start, proposed=proposed, accepted=accepted_total,
        target_forwards=big.forwards,
    )


def _propose(
    draft: Runner, tokens: list[int], k: int, s: SamplingConfig, gen: torch.Generator
) -> tuple[list[int], list[torch.Tensor]]:
    """`k` draft tokens after `tokens`, one forward each, and (when sampling) the draft
    distribution q each was drawn from."""
    proposals: list[int] = []
    q_rows: list[torch.Tensor] = []
    for _ in range(k):
        logits = draft.logits(tokens + proposals, last=1)[0]  # [vocab]
        if s.is_greedy:
            proposals.append(int(torch.argmax(logits).item()))
        else:
            q = probabilities(logits[None], s)[0]
            q_rows.append(q)
            proposals.append(draw(q, gen))
    return proposals, q_rows


def accept_greedy(rows: torch.Tensor, proposals: list[int]) -> tuple[int, int]:
    """(proposals kept, the target's next token): keep while the target's argmax agrees."""
    # rows: [k + 1, vocab] target logits; row i predicts the token after proposal i
    best = rows.argmax(dim=-1).tolist()
    accepted = 0
    while accepted < len(proposals) and best[accepted] == proposals[accepted]:
        accepted += 1
    return accepted, best[accepted]


def accept_sampled(
    p: torch.Tensor, q_rows: list[torch.Tensor], proposals: list[int], gen: torch.Generator
) -> tuple[int, int]:
    """(proposals kept, the next token) by speculative sampling: proposal i, drawn from
    q_i, stays with probability min(1, p_i/q_i); the first rejected one is replaced by a
    draw from max(0, p_i - q_i), renormalised; when all stay, the next token is drawn
    from p_k. The kept tokens are then distributed exactly as draws from p."""
    # p: [k + 1, vocab] target probabilities; q_rows: k x [vocab] draft probabilities
    for i, d in enumerate(proposals):
        ratio = float(p[i, d]) / max(float(q_rows[i][d]), 1e-30)
        if float(torch.rand((), generator=gen)) < min(1.0, ratio):
            continue
        residual = (p[i] - q_rows[i]).clamp_min(0.0)
        total = float(residual.sum())
        return i, draw(residual / total if total > 0 else p[i], gen)
    return len(proposals), draw(p[len(proposals)], gen)
