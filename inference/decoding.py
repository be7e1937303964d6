"""What every decoding loop shares: a model fed through its KV cache, the context budget,
the stop rule, and the result it reports.

Decoding feeds the model only the tokens its KV cache has not seen (`Runner`), so a step
costs one token's forward; without the cache every step re-runs the whole sequence (the
reference the cache is tested against). Speculative decoding also rewinds the cache to
the prefix it kept. Plain decoding (`trident.inference.generate`) and speculative
decoding (`trident.inference.speculative`) both build on these pieces, so they stop for
the same reasons and report the same figures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trident.errors import UserError
from trident.inference.sampling import SamplingConfig
from trident.model.attention import KVCache
from trident.model.config import ModelConfig
from trident.model.gpt import GPT


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    new_ids: list[int]
    stopped_by: str  # length | eod | context
    seconds: float
    proposed: int = 0  # speculative decoding: draft tokens proposed ...
    accepted: int = 0  # ... and accepted by the target
    target_forwards: int = 0  # forward passes of the (target) model, prefill included
    text: str = ""  # the decoded continuation (filled when a tokenizer is at hand)

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None

    @property
    def tokens_per_second(self) -> float:
        return len(self.new_ids) / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        line = (
            f"{len(self.new_ids)} new tokens in {self.seconds:.2f} s ({self.tokens_per_second:.1f} tokens/s, "
            f"{self.target_forwards} forwards); stopped by {self.stopped_by}"
        )
        if self.proposed:
            line += f"; draft acceptance {100 * self.acceptance_rate:.1f}% ({self.accepted}/{self.proposed})"
        return line


class Runner:
    """A model and its KV cache: `logits` feeds only the tokens the cache lacks."""

    def __init__(self, model: GPT, max_len: int, use_cache: bool) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.cache: KVCache | None = model.make_cache(1, max_len) if use_cache else None
        self.forwards = 0

    @torch.no_grad()
    def logits(self, tokens: list[int], last: int) -> torch.Tensor:
        """Full-vocabulary fp32 CPU logits of the last `last` positions of `tokens`."""
        # tokens: the whole sequence so far  ->  [last, vocab]
        start = self.cache.length if self.cache is not None else 0
        assert last <= len(tokens) - start, "the cache already holds positions whose logits are wanted"
        x = torch.tensor([tokens[start:]], dtype=torch.long, device=self.device)  # [1, s_new]
        local = self.model(x, cache=self.cache)  # [1, s_new, padded_vocab/tp]
        self.forwards += 1
        return self.model.full_logits(local)[0, -last:].float().cpu()  # [last, vocab]

    def rewind(self, length: int) -> None:
        """Forget cached positions from `length` on (rejected speculative tokens)."""
        if self.cache is not None:
            self.cache.length = min(self.cache.length, length)


def check_prompt(prompt_ids: list[int], s: SamplingConfig) -> None:
    """The sampling settings are valid and the prompt holds at least one token."""
    s.validate()
    if not prompt_ids:
        raise UserError("the prompt is empty; give at least one token of text")


def context_length(cfg: ModelConfig, prompt_len: int, s: SamplingConfig) -> int:
    """Tokens the cache must hold: the prompt plus what may be generated, within the
    positions the model knows (learned and RoPE tables end at max_seq_len)."""
    want = prompt_len + s.max_new_tokens
    limit = cfg.max_seq_len if cfg.position in ("learned", "rope") else want
    if prompt_len >= limit:
        raise UserError(
            f"the prompt is {prompt_len} tokens, but model.max_seq_len={cfg.max_seq_len} leaves no room to generate; "
            f"shorten it below {limit} tokens"
        )
    return min(want, limit)


def finish(
    tokens: list[int], prompt_len: int, s: SamplingConfig, eod_id: int | None, limit: int
) -> tuple[list[int], str | None]:
    """(new tokens cut at the first EOD, why generation stops or None to go on)."""
    new = tokens[prompt_len:]
    if s.stop_at_eod and eod_id is not None and eod_id in new:
        return new[: new.index(eod_id)], "eod"
    if len(new) >= s.max_new_tokens:
        return new[: s.max_new_tokens], "length"
    if len(tokens) >= limit:
        return new, "context"
    return new, None
