"""Generation: the KV cache changes nothing, speculative greedy is plain greedy, seeds
reproduce, tensor parallelism changes nothing, checkpoints of any layout work, and the
`trident generate` command prints text and the draft's acceptance rate."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from cli_helpers import trident
from hf_helpers import CONFIGS, one_thread, tiny_model, tokenizer, write_checkpoint  # noqa: F401 (fixtures)

from trident.errors import UserError
from trident.inference.generate import generate, generate_from_checkpoint, generate_text, load_model
from trident.inference.sampling import SamplingConfig, probabilities
from trident.inference.speculative import accept_greedy, accept_sampled, speculative_generate

GREEDY = SamplingConfig(max_new_tokens=24, greedy=True, stop_at_eod=False)
PROMPT = [5, 77, 300, 12, 9, 41]


def _draft_of(model, noise: float):
    """A perturbed copy: it agrees with the model often, not always (partial acceptance)."""
    draft = tiny_model(model.cfg, seed=0, noise=0.0)
    draft.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise)
    return draft


@pytest.fixture(scope="module")
def checkpoints(tokenizer, tmp_path_factory) -> dict[str, Path]:
    """A llama-style run's checkpoints folder and a smaller draft model's, with the tokenizer."""
    root = tmp_path_factory.mktemp("gen")
    target = tiny_model(CONFIGS["llama-gqa-untied"], seed=1, noise=0.1)
    draft = dataclasses.replace(CONFIGS["llama-gqa-untied"], n_layers=1, hidden=32, n_heads=4, n_kv_heads=2)
    write_checkpoint(target, root / "run" / "checkpoints", tokenizer)
    write_checkpoint(tiny_model(draft, seed=2, noise=0.1), root / "draft", tokenizer)
    return {"target": root / "run" / "checkpoints", "draft": root / "draft"}


@pytest.mark.parametrize("variant", ["llama-gqa-untied", "gpt2", "alibi"])
def test_greedy_with_cache_equals_greedy_without(variant):
    cfg = CONFIGS.get(variant) or dataclasses.replace(CONFIGS["llama-tied-bias"], position="alibi")
    model = tiny_model(cfg, seed=3, noise=0.1)
    cached = generate(model, PROMPT, GREEDY, use_cache=True)
    full = generate(model, PROMPT, GREEDY, use_cache=False)
    assert cached.new_ids == full.new_ids and len(cached.new_ids) == GREEDY.max_new_tokens
    assert cached.stopped_by == "length"


@pytest.mark.parametrize("variant", ["llama-gqa-untied", "gpt2"])
def test_speculative_greedy_equals_plain_greedy(variant):
    model = tiny_model(CONFIGS[variant], seed=4, noise=0.1)
    plain = generate(model, PROMPT, GREEDY)
    for noise, draft_tokens in ((0.0, 4), (0.03, 3), (0.3, 5)):
        s = dataclasses.replace(GREEDY, draft_tokens=draft_tokens)
        spec = speculative_generate(model, _draft_of(model, noise), PROMPT, s)
        assert spec.new_ids == plain.new_ids, f"draft noise {noise}"
        assert 0 <= spec.accepted <= spec.proposed
        if noise == 0.0:  # the model drafting for itself: every proposal accepted
            assert spec.acceptance_rate == 1.0 and spec.target_forwards < plain.target_forwards
    assert "draft acceptance" in spec.summary()


def test_seeded_sampling_is_reproducible_and_the_filters_work():
    model = tiny_model(CONFIGS["llama-gqa-untied"], seed=5, noise=0.1)
    s = SamplingConfig(max_new_tokens=20, temperature=0.9, top_k=50, top_p=0.95, seed=11, stop_at_eod=False)
    a, b = generate(model, PROMPT, s), generate(model, PROMPT, s)
    c = generate(model, PROMPT, dataclasses.replace(s, seed=12))
    assert a.new_ids == b.new_ids and a.new_ids != c.new_ids
    greedy = generate(model, PROMPT, GREEDY).new_ids[:20]
    for narrow in (dict(top_k=1), dict(top_p=1e-6), dict(temperature=0.0)):
        assert generate(model, PROMPT, dataclasses.replace(s, **narrow)).new_ids == greedy, narrow
    # speculative sampling is seeded too
    draft = _draft_of(model, 0.05)
    spec = [speculative_generate(model, draft, PROMPT, s).new_ids for _ in range(2)]
    assert spec[0] == spec[1] and len(spec[0]) == 20


def test_probabilities_apply_temperature_top_k_and_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    full = torch.softmax(logits, -1)
    s = SamplingConfig()
    assert torch.allclose(probabilities(logits, s), full)
    assert torch.allclose(probabilities(logits, dataclasses.replace(s, temperature=2.0)), torch.softmax(logits / 2, -1))
    top2 = probabilities(logits, dataclasses.replace(s, top_k=2))
    assert torch.allclose(top2, torch.tensor([[full[0, 0], full[0, 1], 0, 0]]) / full[0, :2].sum())
    # nucleus: the first token holds 64%, the first two 88% >= 0.8
    nucleus = probabilities(logits, dataclasses.replace(s, top_p=0.8))
    assert (nucleus[0, 2:] == 0).all() and (nucleus[0, :2] > 0).all()
    assert (probabilities(logits, dataclasses.replace(s, top_p=0.5))[0, 1:] == 0).all()


def test_speculative_sampling_keeps_the_target_distribution():
    """Draft from q, accept or resample against p: the kept first token is distributed as
    p, even when q is far from it (a residual draw from p instead of max(0, p - q) would
    be off by ~0.04 here, well beyond the tolerance)."""
    p = torch.tensor([0.0043, 0.0406, 0.0079, 0.0035, 0.8749, 0.0688])
    q = torch.tensor([0.0001, 0.9900, 0.0001, 0.0008, 0.0040, 0.0050])
    p_rows = torch.stack([p, torch.full_like(p, 1 / 6)])  # row 1: after the proposal, unused here
    gen = torch.Generator().manual_seed(0)
    n, counts, kept = 8000, torch.zeros(6), 0
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=gen))
        accepted, nxt = accept_sampled(p_rows, [q], [d], gen)
        counts[d if accepted else nxt] += 1
        kept += accepted
    freq = counts / n
    assert (freq - p).abs().max() < 4 * (p * (1 - p) / n).sqrt().max(), (freq, p)
    assert abs(kept / n - torch.minimum(p, q).sum()) < 0.015  # acceptance rate = sum of min(p, q)
    # greedy: argmaxes are 2, 0, 1; proposal 2 stays, proposal 1 is replaced by the target's 0
    assert accept_greedy(torch.eye(3)[[2, 0, 1]], [2, 1]) == (1, 0)
    assert accept_greedy(torch.eye(3)[[2, 0, 1]], [2, 0]) == (2, 1)


def test_user_mistakes_are_one_sentence():
    model = tiny_model(CONFIGS["llama-gqa-untied"])
    with pytest.raises(UserError, match="top-p"):
        generate(model, PROMPT, SamplingConfig(top_p=0.0))
    with pytest.raises(UserError, match="max_seq_len=64"):
        generate(model, list(range(64)), GREEDY)
    with pytest.raises(UserError, match="empty"):
        generate(model, [], GREEDY)
    other = tiny_model(dataclasses.replace(CONFIGS["llama-gqa-untied"], vocab_size=300))
    with pytest.raises(UserError, match="vocabulary"):
        speculative_generate(model, other, PROMPT, GREEDY)


def test_generation_stops_at_the_context_and_at_eod():
    model = tiny_model(CONFIGS["gpt2"], seed=7, noise=0.1)
    long = generate(model, list(range(1, 60)), dataclasses.replace(GREEDY, max_new_tokens=20))
    assert long.stopped_by == "context" and len(long.new_ids) == 5
    first = generate(model, PROMPT, GREEDY).new_ids
    eod = first[3]
    cut = generate(model, PROMPT, dataclasses.replace(GREEDY, stop_at_eod=True), eod_id=eod)
    assert cut.stopped_by == "eod" and cut.new_ids == first[: first.index(eod)]


def test_text_from_a_checkpoint(checkpoints, tokenizer):
    from trident.data.tokenizer import load_tokenizer

    res = generate_text(checkpoints["target"], "def main(", GREEDY)
    tok = load_tokenizer(tokenizer)
    assert res.prompt_ids == tok.encode("def main(") and len(res.new_ids) == 24
    assert tok.decode(res.prompt_ids + res.new_ids) == "def main(" + res.text
    sample = generate_from_checkpoint(checkpoints["target"], "def main(", max_new_tokens=24, greedy=True)
    stopping = generate_text(checkpoints["target"], "def main(", dataclasses.replace(GREEDY, stop_at_eod=True))
    assert sample == "def main(" + stopping.text


# --- tensor parallel (2 gloo ranks) ---------------------------------------------------------------
def _tp2_generate(target: str, draft: str, out: str) -> dict:
    """Generate at tp=2 from a tp=1 checkpoint; save the model at tp=2 for the reverse check."""
    from trident.checkpoint.checkpoint import RunState, save_checkpoint
    from trident.parallel.random import RNGStreams
    from trident.parallel.topology import Topology
    from trident.parallel.zero.optimizer import DistributedOptimizer, OptimizerConfig

    topo = Topology.from_initialized(tp=2)
    sampled = SamplingConfig(max_new_tokens=16, temperature=0.8, top_k=40, seed=3, stop_at_eod=False)
    spec = dataclasses.replace(GREEDY, draft_tokens=3)
    result = {
        "greedy": generate_text(target, "def main(", GREEDY, topo=topo).new_ids,
        "sampled": generate_text(target, "import os", sampled, topo=topo).new_ids,
        "speculative": generate_text(target, "def main(", spec, draft_checkpoint=draft, topo=topo).new_ids,
    }
    model, meta = load_model(target, topo)
    opt = DistributedOptimizer(model, topo, OptimizerConfig(zero=0))
    state = RunState(tokenizer=meta["tokenizer"], config=meta["config"])
    save_checkpoint(out, 1, topo, model, opt, RNGStreams(0, topo), state)
    return result


def test_tp2_generation_equals_tp1_and_any_layout_loads(checkpoints, tmp_path, dist_pool):
    sampled = SamplingConfig(max_new_tokens=16, temperature=0.8, top_k=40, seed=3, stop_at_eod=False)
    expected = {
        "greedy": generate_text(checkpoints["target"], "def main(", GREEDY).new_ids,
        "sampled": generate_text(checkpoints["target"], "import os", sampled).new_ids,
    }
    spec = generate_text(checkpoints["target"], "def main(", dataclasses.replace(GREEDY, draft_tokens=3),
                         draft_checkpoint=checkpoints["draft"])
    expected["speculative"] = spec.new_ids
    assert spec.new_ids == expected["greedy"] and spec.proposed > 0
    results = dist_pool.run(2, "test_generate:_tp2_generate", target=str(checkpoints["target"]),
                            draft=str(checkpoints["draft"]), out=str(tmp_path / "tp2"))
    for rank, res in enumerate(results):
        assert res == expected, f"rank {rank}"
    meta = json.loads((tmp_path / "tp2" / "step_0000001" / "meta.json").read_text())
    assert meta["layout"]["tp"] == 2
    assert generate_text(tmp_path / "tp2", "def main(", GREEDY).new_ids == expected["greedy"]


# --- the command -------------------------------------------------------------------------------------
def test_generate_command(checkpoints, tokenizer, tmp_path, capsys):
    run_dir = checkpoints["target"].parent
    proc = trident("generate", "--checkpoint", str(run_dir), "--prompt", "def main(", "--greedy", "--max-new-tokens",
                   "12", "--no-stop", "--draft-checkpoint", str(checkpoints["draft"]), "--draft-tokens", "3")
    expected = generate_text(run_dir, "def main(", dataclasses.replace(GREEDY, max_new_tokens=12))
    assert proc.stdout == "def main(" + expected.text + "\n"
    assert "12 new tokens" in proc.stderr and "draft acceptance" in proc.stderr and "tp=1 on cpu" in proc.stderr

    from trident.tools.cli import main

    assert main(["generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "x", "--top-p", "1.5"]) == 2
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "x", "--tokenizer", str(tmp_path / "t.model")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "--top-p must be in (0, 1]" in err
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "", "--seed", "1", "--max-new-tokens", "5"]) == 0
