"""The model on its own: configs, user errors, KV-cache decoding, packed documents, presets,
the vocabulary-parallel loss, and the dropout streams."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from equivalence import VARIANTS, rel_err
from trident.errors import UserError
from trident.model.config import ModelConfig, preset
from trident.model.gpt import GPT, document_positions
from trident.parallel.tensor.cross_entropy import vocab_parallel_cross_entropy
from trident.parallel.topology import Topology


def _model(cfg: ModelConfig, seed: int = 0) -> GPT:
    model = GPT(cfg, Topology.single())
    model.init_weights(seed)
    return model.eval()


@pytest.mark.parametrize(
    "overrides, tp, words",
    [
        ({"n_heads": 8, "n_kv_heads": 8}, 3, "model.n_heads=8 is not divisible by tp=3"),
        ({"n_heads": 12, "n_kv_heads": 3, "hidden": 96, "ffn_hidden": 128}, 2, "model.n_kv_heads=3 is neither divisible by tp=2 nor a divisor of it"),
        ({"n_heads": 4, "n_kv_heads": 4, "ffn_hidden": 130}, 4, "model.ffn_hidden=130 is not divisible by tp=4"),
        ({"position": "sinusoid"}, 1, "model.position is 'sinusoid'; valid values are learned, rope, alibi, none"),
        ({"n_heads": 8, "n_kv_heads": 3}, 1, "model.n_kv_heads=3 must be >= 1 and divide model.n_heads=8"),
        ({"hidden": 60, "n_heads": 8}, 1, "model.hidden=60 is not divisible by model.n_heads=8"),
    ],
)
def test_config_errors_name_the_values(overrides, tp, words):
    cfg = dataclasses.replace(preset("tiny"), **overrides)
    with pytest.raises(UserError) as info:
        cfg.check_tp(tp)
    assert words in str(info.value)


def test_kv_heads_replicated_when_they_divide_tp():
    preset("tiny", n_heads=8, n_kv_heads=2).check_tp(4)  # 2 kv heads on 4 ranks: replicated
    preset("tiny", n_heads=8, n_kv_heads=1).check_tp(4)  # multi-query


def test_input_errors_are_clear():
    model = _model(preset("tiny"))
    with pytest.raises(UserError, match=r"token ids must be in \[0, 101\); got min 0, max 101"):
        model(torch.tensor([[0, 101]]))
    with pytest.raises(UserError, match="sequence of 65 tokens is longer than model.max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(UserError, match="token ids"):
        model(torch.tensor([[-1, 3]]))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_decoding_matches_full_forward(variant):
    cfg = VARIANTS[variant]
    model = _model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model.full_logits(model(tokens))
        cache = model.make_cache(batch=2, max_len=16)
        steps = [model.full_logits(model(tokens[:, :5], cache=cache))]
        for i in range(5, 12):
            steps.append(model.full_logits(model(tokens[:, i : i + 1], cache=cache)))
    assert cache.length == 12
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-5


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_documents_see_only_themselves(variant):
    """A document packed after another gives the logits it gives alone (masking and
    per-document positions), and the first document is unaffected by what follows."""
    cfg = VARIANTS[variant]
    model = _model(cfg)
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randint(0, cfg.vocab_size, (1, 7), generator=gen), torch.randint(0, cfg.vocab_size, (1, 9), generator=gen)
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 9])
    with torch.no_grad():
        out = model.full_logits(model(packed, doc_ids=doc_ids))
        alone_a, alone_b = model.full_logits(model(a)), model.full_logits(model(b))
    assert rel_err(out[:, :7], alone_a) < 1e-5
    assert rel_err(out[:, 7:], alone_b) < 1e-5


def test_document_positions_reset_at_boundaries():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert document_positions(doc).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("gpt2-124m", 124_439_808),  # Hugging Face gpt2: 124,439,808 parameters
        ("llama-1b", 1_235_814_400),  # Llama 3.2 1B
        ("llama-8b", 8_030_261_248),  # Llama 3 8B
    ],
)
def test_presets_have_the_published_sizes(name, expected):
    cfg = preset(name)
    assert cfg.num_parameters() == expected
    # the model built without memory (meta device) holds exactly those global tensors
    model = GPT(cfg, Topology.single("meta"), device="meta")
    from trident.parallel.tensor.sharding import global_shapes

    total = sum(torch.Size(s).numel() for s in global_shapes(model).values())
    assert total == expected


def test_vocab_parallel_cross_entropy_matches_torch_with_padding_and_smoothing():
    gen = torch.Generator().manual_seed(5)
    vocab, padded = 50, 64
    logits = torch.randn(3, 7, padded, generator=gen, requires_grad=True)
    target = torch.randint(0, vocab, (3, 7), generator=gen)
    for eps in (0.0, 0.1):
        ours = vocab_parallel_cross_entropy(logits, target, 0, vocab, None, label_smoothing=eps)
        ref = F.cross_entropy(logits[..., :vocab].reshape(-1, vocab), target.reshape(-1), reduction="none", label_smoothing=eps)
        assert rel_err(ours.reshape(-1), ref) < 1e-6
        (g_ours,) = torch.autograd.grad(ours.sum(), logits)
        (g_ref,) = torch.autograd.grad(ref.sum(), logits)
        assert rel_err(g_ours, g_ref) < 1e-6
        assert g_ours[..., vocab:].abs().max() == 0  # padding never gets gradient


def test_padding_never_wins_even_when_its_logit_is_largest():
    logits = torch.tensor([[-5.0, -6.0, 0.0, 0.0]])  # columns 2, 3 are padding
    loss = vocab_parallel_cross_entropy(logits, torch.tensor([0]), 0, 2, None)
    assert torch.allclose(loss, F.cross_entropy(logits[:, :2], torch.tensor([0]), reduction="none"))


# --- distributed: dropout streams and the KV cache under tp ----------------------------------
def _dropout_and_cache_tp2() -> dict:
    import torch.distributed as dist

    from trident.model.gpt import GPT
    from trident.parallel.random import RNGStreams
    from trident.parallel.topology import Topology

    topo = Topology.from_initialized(tp=2)
    cfg = preset("tiny", dropout=0.2, attention_dropout=0.2)
    rng = RNGStreams(seed=7, topo=topo)
    model = GPT(cfg, topo, rng=rng)
    model.init_weights(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))

    # hidden state after the blocks (a replicated region) is identical on both tp ranks
    model.train()
    saved = rng.state_dict()
    stage = GPT(cfg, topo, last_stage=False, rng=rng)
    stage.load_state_dict(model.state_dict(), strict=False)
    hidden = stage(tokens)
    both = [torch.zeros_like(hidden) for _ in range(2)]
    dist.all_gather(both, hidden.detach())
    same_hidden = torch.equal(both[0], both[1])

    # restoring the streams replays the same masks; a fresh draw differs
    rng.load_state_dict(saved)
    loss_a = model(tokens, labels=tokens).mean().item()
    rng.load_state_dict(saved)
    loss_b = model(tokens, labels=tokens).mean().item()
    loss_c = model(tokens, labels=tokens).mean().item()
    model.eval()
    loss_eval = model(tokens, labels=tokens).mean().item()

    states = rng.state_dict()
    gathered = {}
    for name, state in states.items():
        out = [torch.zeros_like(state) for _ in range(2)]
        dist.all_gather(out, state)
        gathered[name] = torch.equal(out[0], out[1])

    # KV-cache decoding under tp equals the single-process full forward
    ref = GPT(cfg, Topology.single())
    ref.init_weights(0)
    ref.eval()
    with torch.no_grad():
        full = ref.full_logits(ref(tokens))
        cache = model.make_cache(2, 16)
        steps = [model.full_logits(model(tokens[:, :4], cache=cache))]
        for i in range(4, 16):
            steps.append(model.full_logits(model(tokens[:, i : i + 1], cache=cache)))
    return {
        "same_hidden": same_hidden,
        "replay": loss_a == loss_b,
        "fresh_differs": loss_a != loss_c,
        "eval_differs": loss_eval != loss_a,
        "streams_equal_across_tp": gathered,
        "cache_err": rel_err(torch.cat(steps, 1), full),
    }


def test_dropout_streams_and_kv_cache_under_tp(dist_pool):
    for res in dist_pool.run(2, "test_model:_dropout_and_cache_tp2"):
        assert res["same_hidden"], "dropout in the replicated region must use the same mask on every tp rank"
        assert res["replay"] and res["fresh_differs"] and res["eval_differs"]
        assert res["streams_equal_across_tp"] == {"replicated": True, "tp": False}
        assert res["cache_err"] < 1e-5
