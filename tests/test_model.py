"""The model on its own: configs, user errors, KV-cache decoding, packed documents, presets,
the dropout streams, and the plain PyTorch reference model the benchmarks compare against."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from equivalence import VARIANTS, gather_checked, rel_err
from trident.errors import UserError
from trident.model.config import PRESETS, ModelConfig, preset
from trident.model.gpt import GPT, document_positions
from trident.model.reference import ReferenceGPT
from trident.model.stage import build_stage
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


def test_kv_heads_are_split_or_replicated_never_cut():
    """kv heads are split when tp divides them and replicated when they divide tp; any
    other pair would cut a head's rows across ranks and is refused."""
    sizes = (1, 2, 3, 4, 6, 12)
    accepted = set()
    for kv in sizes:
        for tp in sizes:
            cfg = preset("tiny", n_heads=12, n_kv_heads=kv, hidden=96, ffn_hidden=144)
            try:
                assert cfg.check_tp(tp) is cfg
                accepted.add((kv, tp))
            except UserError as err:
                assert f"model.n_kv_heads={kv} is neither divisible by tp={tp} nor a divisor of it" in str(err)
    assert {(2, 4), (1, 4), (1, 12), (3, 6)} <= accepted  # replicated (1 = multi-query)
    assert {(4, 2), (12, 4), (6, 3)} <= accepted  # split
    assert {(2, 3), (3, 2), (4, 6), (6, 4), (3, 4), (4, 3)}.isdisjoint(accepted)
    assert accepted == {(kv, tp) for kv in sizes for tp in sizes if kv % tp == 0 or tp % kv == 0}


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


# --- the plain PyTorch reference of the benchmarks -------------------------------------------
ARCHS = {
    "llama-gqa-untied": {},
    "gpt2-learned-gelu-tied": dict(norm="layernorm", position="learned", activation="gelu", bias=True,
                                   tie_embeddings=True, n_kv_heads=None),
    "post-norm": dict(norm_position="post", n_kv_heads=2),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_reference_model_is_the_same_function(arch):
    """The benchmark's ratio compares like with like only if the reference computes what
    trident computes: same loss and same gradients from the same weights."""
    cfg = dataclasses.replace(PRESETS["tiny"], **ARCHS[arch])
    model = build_stage(cfg, Topology.single("cpu"))
    model.init_weights(3)
    ref = ReferenceGPT(cfg)
    ref.load_trident(gather_checked(model, None))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (2, 32), generator=g)
    ours = model(tokens, labels).mean()
    theirs = ref(tokens, labels)
    ours.backward()
    theirs.backward()
    assert abs(ours.item() - theirs.item()) <= 1e-6 * abs(theirs.item())
    grads = gather_checked(model, None, grads=True)
    pairs = {"blocks.1.q.weight": "layers.1.attn.qkv.q.weight", "blocks.0.down.weight": "layers.0.mlp.proj.weight",
             "blocks.0.norm1.weight": "layers.0.norm1.weight"}
    mine = dict(ref.named_parameters())
    for theirs_name, ours_name in pairs.items():
        torch.testing.assert_close(mine[theirs_name].grad, grads[ours_name], rtol=1e-4, atol=1e-7)


def test_reference_refuses_what_it_cannot_express():
    cfg = dataclasses.replace(PRESETS["tiny"], position="alibi")
    with pytest.raises(ValueError, match="no 'alibi' positions; it supports rope and learned"):
        ReferenceGPT(cfg)
