"""Text generation from a checkpoint: sampling, a KV cache, tensor parallelism, speculative decoding.

The model is rebuilt from the checkpoint at generation's own layout, whatever layout
trained it: one process at tp = 1 (every tensor read whole), or tp = world under
torchrun, each rank reading only its slices (`trident.checkpoint.checkpoint.load_model`).
Generation always runs the whole depth in each process (pp = 1).

Decoding feeds the model only the tokens its KV cache has not seen, so a step costs one
token's forward; without the cache every step re-runs the whole sequence (the reference
the cache is tested against). Each step's full-vocabulary logits are turned into a
token on the CPU, in fp32, with one seeded generator: greedy takes the argmax; sampling
divides by the temperature, keeps the `top_k` best and the smallest set whose
probability reaches `top_p`, and draws. Under tensor parallelism every rank holds the
same gathered logits and the same generator, and the chosen tokens are still broadcast
from the first tp rank, so the ranks cannot drift apart and leave one waiting in a
collective.

Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model
proposes `draft_tokens` tokens one at a time, the target model scores all of them in
one forward, and the longest acceptable prefix is kept plus one token from the target.
Greedy acceptance keeps a proposal when it equals the target's argmax, so the output
is the target's own greedy output; with sampling a proposal is accepted with
probability min(1, p/q) and a rejection draws from max(0, p - q), which leaves the
output distributed exactly as the target's. Both caches are then rewound to the kept
prefix. The acceptance rate (accepted / proposed) measures how well the draft predicts
the target.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trident.data.tokenizer import Tokenizer, load_tokenizer
from trident.errors import UserError
from trident.model.config import ModelConfig
from trident.model.gpt import GPT, KVCache
from trident.parallel.topology import Topology
from trident.checkpoint import checkpoint as ckpt


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


# --- loading ------------------------------------------------------------------------------------
def load_model(
    checkpoint: str | os.PathLike,
    topo: Topology | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[GPT, dict]:
    """The whole model of a checkpoint saved at any layout, for inference at `topo`'s tp
    (default: one process on CPU), and the checkpoint's meta.json (with ``"path"``)."""
    path = ckpt.find_checkpoint(checkpoint)
    meta = ckpt.read_meta(path)
    cfg = ckpt.model_config(meta)
    topo = topo if topo is not None else Topology.single()
    if topo.pp != 1 or topo.dp != 1:
        raise UserError(f"generation runs tensor-parallel only; got pp={topo.pp} dp={topo.dp}, use tp = world size")
    cfg.check_tp(topo.tp)
    model = GPT(cfg, topo, device=topo.device, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # vocabulary padding rows belong to no stored tensor
    ckpt.load_model(path, model)
    meta["path"] = str(path)
    return model.eval(), meta


def checkpoint_tokenizer(meta: dict, override: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer a checkpoint was trained with (or `override`), opened."""
    if override is not None:
        return load_tokenizer(override)
    found = ckpt.find_tokenizer(meta["path"], meta)
    if found is None:
        raise UserError(
            f"the tokenizer of {meta['path']!r} (recorded as {meta.get('tokenizer')!r}) was not found; "
            "pass --tokenizer PATH"
        )
    return load_tokenizer(found)


# --- one model fed incrementally --------------------------------------------------------------
class _Runner:
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


# --- choosing tokens --------------------------------------------------------------------------
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


def _draw(probs: torch.Tensor, gen: torch.Generator) -> int:
    # probs: [vocab]
    return int(torch.multinomial(probs, 1, generator=gen).item())


def _choose(logits: torch.Tensor, s: SamplingConfig, gen: torch.Generator) -> int:
    # logits: [vocab]
    if s.is_greedy:
        return int(torch.argmax(logits).item())
    return _draw(probabilities(logits[None], s)[0], gen)


def _agree(values: list[int], topo: Topology) -> list[int]:
    """The first tp rank's `values` on every rank (a no-op in one process)."""
    if topo.tp == 1 or topo.tp_group is None:
        return values
    device = topo.device if topo.device.type == "cuda" else torch.device("cpu")
    src = topo.rank - topo.tp_rank  # tp ranks are consecutive: the group's first global rank
    n = torch.tensor([len(values)], dtype=torch.long, device=device)
    dist.broadcast(n, src=src, group=topo.tp_group)
    t = torch.tensor(values if topo.tp_rank == 0 else [0] * int(n.item()), dtype=torch.long, device=device)
    dist.broadcast(t, src=src, group=topo.tp_group)
    return [int(v) for v in t.cpu().tolist()]


def _generator(s: SamplingConfig, topo: Topology) -> torch.Generator:
    seed = s.seed if s.seed is not None else int.from_bytes(os.urandom(7), "little")
    seed = _agree([seed], topo)[0]  # one stream on every tp rank, even when drawn at random
    return torch.Generator().manual_seed(seed)


def _context(cfg: ModelConfig, prompt_len: int, s: SamplingConfig) -> int:
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


def _finish(
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


# --- plain and speculative decoding ---------------------------------------------------------------
def generate(
    model: GPT,
    prompt_ids: list[int],
    s: SamplingConfig,
    eod_id: int | None = None,
    use_cache: bool = True,
) -> GenerationResult:
    """Continue `prompt_ids` one token per forward (every tp rank calls it alike)."""
    s.validate()
    if not prompt_ids:
        raise UserError("the prompt is empty; give at least one token of text")
    topo = model.topo
    limit = _context(model.cfg, len(prompt_ids), s)
    runner = _Runner(model, limit, use_cache)
    gen = _generator(s, topo)
    tokens = list(prompt_ids)
    start = time.perf_counter()
    while True:
        logits = runner.logits(tokens, last=1)[0]  # [vocab]
        tokens += _agree([_choose(logits, s, gen)], topo)
        new, stopped = _finish(tokens, len(prompt_ids), s, eod_id, limit)
        if stopped is not None:
            break
    return GenerationResult(list(prompt_ids), new, stopped, time.perf_counter() - start, target_forwards=runner.forwards)


def speculative_generate(
    target: GPT,
    draft: GPT,
    prompt_ids: list[int],
    s: SamplingConfig,
    eod_id: int | None = None,
) -> GenerationResult:
    """Continue `prompt_ids` with `draft` proposing and `target` verifying (see the module
    docstring); greedy output equals `generate(target, ...)`'s."""
    s.validate()
    if not prompt_ids:
        raise UserError("the prompt is empty; give at least one token of text")
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise UserError(
            f"the draft model's vocabulary ({draft.cfg.vocab_size}) differs from the target's ({target.cfg.vocab_size}); "
            "the draft must share the target's tokenizer"
        )
    topo = target.topo
    limit = min(_context(target.cfg, len(prompt_ids), s), _context(draft.cfg, len(prompt_ids), s))
    big, small = _Runner(target, limit, True), _Runner(draft, limit, True)
    gen = _generator(s, topo)
    tokens = list(prompt_ids)
    proposed = accepted_total = 0
    start = time.perf_counter()
    while True:
        room = min(s.max_new_tokens - (len(tokens) - len(prompt_ids)), limit - len(tokens))
        k = min(s.draft_tokens, room - 1)  # the target always adds one token of its own
        proposals: list[int] = []
        q_rows: list[torch.Tensor] = []
        for _ in range(k):
            logits = small.logits(tokens + proposals, last=1)[0]  # [vocab]
            if s.is_greedy:
                proposals.append(int(torch.argmax(logits).item()))
            else:
                q = probabilities(logits[None], s)[0]
                q_rows.append(q)
                proposals.append(_draw(q, gen))
        proposals = _agree(proposals, topo)  # the target's ranks must score the same tokens
        rows = big.logits(tokens + proposals, last=k + 1)  # [k + 1, vocab]: row i predicts after proposal i
        if s.is_greedy:
            accepted, nxt = accept_greedy(rows, proposals)
        else:
            accepted, nxt = accept_sampled(probabilities(rows, s), q_rows, proposals, gen)
        kept = _agree(proposals[:accepted] + [nxt], topo)
        proposed += k
        accepted_total += len(kept) - 1
        tokens += kept
        big.rewind(len(tokens) - 1)  # keep only the positions of tokens that stayed
        small.rewind(len(tokens) - 1)
        new, stopped = _finish(tokens, len(prompt_ids), s, eod_id, limit)
        if stopped is not None:
            break
    return GenerationResult(
        list(prompt_ids), new, stopped, time.perf_counter() - start, proposed=proposed, accepted=accepted_total,
        target_forwards=big.forwards,
    )


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
        return i, _draw(residual / total if total > 0 else p[i], gen)
    return len(proposals), _draw(p[len(proposals)], gen)


# --- text in, text out ------------------------------------------------------------------------
def encode_prompt(tok: Tokenizer, prompt: str) -> list[int]:
    """Prompt ids; an empty prompt starts a fresh document (after the EOD token trident
    trains with between documents, or BOS when there is no EOD)."""
    ids = tok.encode(prompt)
    if ids:
        return ids
    start = tok.eod_id if tok.eod_id is not None else tok.bos_id
    if start is None:
        raise UserError("the prompt is empty and the tokenizer has no EOD or BOS token to start from; give some text")
    return [start]


def continuation_text(tok: Tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text the new tokens add, decoded together with the prompt so that a leading
    space the tokenizer folds into the first piece is kept."""
    before = tok.decode(prompt_ids)
    full = tok.decode(prompt_ids + new_ids)
    return full[len(before):] if full.startswith(before) else tok.decode(new_ids)


def generate_text(
    checkpoint: str | os.PathLike,
    prompt: str,
    sampling: SamplingConfig | None = None,
    draft_checkpoint: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    topo: Topology | None = None,
    dtype: torch.dtype = torch.float32,
    use_cache: bool = True,
) -> GenerationResult:
    """Load the checkpoint (and a draft), encode `prompt`, generate, decode the continuation."""
    s = (sampling or SamplingConfig()).validate()
    model, meta = load_model(checkpoint, topo, dtype)
    tok = checkpoint_tokenizer(meta, tokenizer)
    if tok.vocab_size > model.cfg.vocab_size:
        raise UserError(
            f"the tokenizer has {tok.vocab_size} tokens but the model only {model.cfg.vocab_size}; "
            "pass the --tokenizer the model was trained with"
        )
    ids = encode_prompt(tok, prompt)
    if draft_checkpoint is not None:
        # the draft runs whole on every rank: it is small, and needs no collectives
        single = Topology.single(model.topo.device)
        draft, _ = load_model(draft_checkpoint, single, dtype)
        result = speculative_generate(model, draft, ids, s, tok.eod_id)
    else:
        result = generate(model, ids, s, tok.eod_id, use_cache=use_cache)
    result.text = continuation_text(tok, result.prompt_ids, result.new_ids)
    return result


def generate_from_checkpoint(
    checkpoint: str | os.PathLike,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = 0,
    greedy: bool = False,
    draft_checkpoint: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
) -> str:
    """`prompt` followed by its generated continuation, in one process on the CPU: the
    sample a demo prints after training."""
    s = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       greedy=greedy, seed=seed)
    return prompt + generate_text(checkpoint, prompt, s, draft_checkpoint, tokenizer).text


__all__ = [
    "SamplingConfig", "GenerationResult", "load_model", "generate", "speculative_generate", "generate_text",
    "generate_from_checkpoint", "probabilities",
]
