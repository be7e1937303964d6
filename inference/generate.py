"""Text generation from a checkpoint: load the model at generation's layout, decode, detokenize.

The model is rebuilt from the checkpoint at generation's own layout, whatever layout
trained it: one process at tp = 1 (every tensor read whole), or tp = world under
torchrun, each rank reading only its slices (`trident.checkpoint.checkpoint.load_model`).
Generation always runs the whole depth in each process (pp = 1).

This module is the entry point (`generate_text`, used by `trident generate` and the
demo) and the plain decoding loop, one token per forward through the KV cache. The
parts live beside it: how a token is chosen (`trident.inference.sampling`), the cache
runner and stop rule both loops share (`trident.inference.decoding`), and the draft /
verify loop (`trident.inference.speculative`).
"""

from __future__ import annotations

import os
import time

import torch

from trident.checkpoint import checkpoint as ckpt
from trident.data.tokenizer import Tokenizer, load_tokenizer
from trident.errors import UserError
from trident.inference.decoding import GenerationResult, Runner, check_prompt, context_length, finish
from trident.inference.sampling import SamplingConfig, agree, choose, sampling_generator
from trident.inference.speculative import speculative_generate
from trident.model.gpt import GPT
from trident.parallel.topology import Topology


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


# --- plain decoding ---------------------------------------------------------------------------
def generate(
    model: GPT,
    prompt_ids: list[int],
    s: SamplingConfig,
    eod_id: int | None = None,
    use_cache: bool = True,
) -> GenerationResult:
    """Continue `prompt_ids` one token per forward (every tp rank calls it alike)."""
    check_prompt(prompt_ids, s)
    topo = model.topo
    limit = context_length(model.cfg, len(prompt_ids), s)
    runner = Runner(model, limit, use_cache)
    gen = sampling_generator(s, topo)
    tokens = list(prompt_ids)
    start = time.perf_counter()
    while True:
        logits = runner.logits(tokens, last=1)[0]  # [vocab]
        tokens += agree([choose(logits, s, gen)], topo)
        new, stopped = finish(tokens, len(prompt_ids), s, eod_id, limit)
        if stopped is not None:
            break
    return GenerationResult(list(prompt_ids), new, stopped, time.perf_counter() - start, target_forwards=runner.forwards)


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
