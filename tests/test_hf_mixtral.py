"""Hugging Face Mixtral export and import, with transformers' MixtralForCausalLM as the ground truth:
the same logits and the same greedy continuation both ways, an exact round trip, and MoE
settings that Mixtral cannot express refused by name. Nothing is downloaded."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from equivalence import gather_checked
from hf_helpers import tiny_model

from trident.checkpoint.hf import export_hf, import_hf
from trident.errors import UserError
from trident.inference.generate import generate
from trident.inference.sampling import SamplingConfig
from trident.model.config import ModelConfig
from trident.model.gpt import GPT
from trident.parallel.tensor.sharding import load_full
from trident.parallel.topology import Topology

transformers = pytest.importorskip("transformers", reason="the HF ground-truth checks need transformers")

CFG = ModelConfig(vocab_size=97, n_layers=2, hidden=48, n_heads=6, n_kv_heads=2, ffn_hidden=80, max_seq_len=64,
                  moe_experts=4, moe_top_k=2, moe_ffn_hidden=40, moe_aux_loss_coef=0.01)
GREEDY = SamplingConfig(max_new_tokens=8, greedy=True, stop_at_eod=False)
PROMPT = [5, 17, 3, 60, 41, 8]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _hf_greedy(hf, prompt: list[int]) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=GREEDY.max_new_tokens, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def test_export_loads_in_transformers_with_our_logits_and_generation(tmp_path):
    model = tiny_model(CFG, seed=3, noise=0.05)
    tensors = gather_checked(model, None)
    folder = export_hf(CFG, tensors, tmp_path / "hf")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert type(hf).__name__ == "MixtralForCausalLM"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    hf.eval()
    x = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _rel(model.full_logits(model(x)), hf(x).logits) <= 1e-4
        assert generate(model, PROMPT, GREEDY).new_ids == _hf_greedy(hf, PROMPT)
    # and back: the same config and bit-identical tensors
    cfg, back = import_hf(folder)
    assert dataclasses.replace(cfg, vocab_pad_multiple=CFG.vocab_pad_multiple, ffn_hidden=CFG.ffn_hidden) == CFG
    assert back.keys() == tensors.keys() and all(torch.equal(back[n], t) for n, t in tensors.items())


def test_model_saved_by_transformers_imports_with_its_logits_and_generation(tmp_path):
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=97, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        rope_theta=20000.0, sliding_window=None, tie_word_embeddings=False,
    )
    hf = transformers.MixtralForCausalLM(config)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "hf")
    cfg, tensors = import_hf(tmp_path / "hf")
    assert (cfg.moe_experts, cfg.moe_top_k, cfg.moe_ffn, cfg.moe_router) == (4, 2, 40, "softmax")
    model = GPT(cfg, Topology.single())
    load_full(model, tensors)
    model.eval()
    hf.eval()
    x = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert _rel(model.full_logits(model(x)), hf(x).logits) <= 1e-4
        assert generate(model, PROMPT, GREEDY).new_ids == _hf_greedy(hf, PROMPT)


@pytest.mark.parametrize("change, feature", [
    (dict(moe_router="sigmoid"), "the 'sigmoid' router"),
    (dict(moe_shared_experts=1), "shared experts"),
    (dict(moe_layer_freq=2), "dense blocks between MoE blocks"),
    (dict(moe_bias_update_rate=0.01), "selection bias"),
])
def test_settings_mixtral_cannot_express_are_refused(change, feature, tmp_path):
    cfg = dataclasses.replace(CFG, **change)
    tensors = gather_checked(GPT(cfg, Topology.single()), None)
    with pytest.raises(UserError, match=feature):
        export_hf(cfg, tensors, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_fused_expert_layout_imports_like_the_hub_layout():
    """transformers 5's in-memory names (gate_up_proj [E, 2f, h], down_proj [E, h, f]) map to the same tensors."""
    from trident.checkpoint.hf_mixtral import from_mixtral, to_mixtral

    tensors = gather_checked(tiny_model(CFG, seed=4), None)
    hub = to_mixtral(CFG, tensors)
    fused = dict(hub)
    for i in range(CFG.n_layers):
        p = f"model.layers.{i}"
        experts = [f"{p}.block_sparse_moe.experts.{e}" for e in range(CFG.moe_experts)]
        fused[f"{p}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([fused.pop(f"{x}.w1.weight"), fused.pop(f"{x}.w3.weight")]) for x in experts])
        fused[f"{p}.mlp.experts.down_proj"] = torch.stack([fused.pop(f"{x}.w2.weight") for x in experts])
        fused[f"{p}.mlp.gate.weight"] = fused.pop(f"{p}.block_sparse_moe.gate.weight")
    back = from_mixtral(CFG, fused)
    assert back.keys() == tensors.keys() and all(torch.equal(back[n], t) for n, t in tensors.items())
