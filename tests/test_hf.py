"""Hugging Face export and import, against transformers itself as the ground truth.

Tiny llama-style (GQA untied; tied with biases) and gpt2-style models go trident ->
HF folder -> trident checkpoint -> HF folder with every tensor unchanged; transformers'
LlamaForCausalLM / GPT2LMHeadModel load the export and give our logits; models that
transformers builds and saves import and give its logits; AutoTokenizer loads the
exported tokenizer and encodes like our sentencepiece model; configs no HF architecture
expresses are refused naming the feature; an imported checkpoint loads at tp=2 and pp=2.
Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from equivalence import gather_checked
from hf_helpers import CONFIGS, one_thread, tiny_model, tokenizer, write_checkpoint  # noqa: F401 (fixtures)

from trident.checkpoint import checkpoint as ckpt
from trident.checkpoint.hf import export_hf, import_hf
from trident.checkpoint.hf_checkpoint import export_checkpoint, import_checkpoint
from trident.checkpoint.hf_files import read_safetensors
from trident.errors import UserError

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed; the HF ground-truth checks need it (pip install '.[test]')"
)
ATOL = 1e-5


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory) -> dict[str, tuple]:
    """Per variant: (model, its whole tensors, HF folder)."""
    out = {}
    for name, cfg in CONFIGS.items():
        model = tiny_model(cfg, seed=len(out))
        tensors = gather_checked(model, None)
        folder = export_hf(cfg, tensors, tmp_path_factory.mktemp(name), tokenizer_path=tokenizer)
        out[name] = (model, tensors, folder)
    return out


def tensors_bytes(path: Path) -> dict[str, int]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {n: f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in f.keys()}


def _tokens(n: int = 24, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, CONFIGS["gpt2"].vocab_size, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_round_trip_through_a_checkpoint_is_exact(variant, exported, tmp_path):
    model, tensors, folder = exported[variant]
    cfg, back = import_hf(folder)
    assert dataclasses.replace(cfg, vocab_pad_multiple=model.cfg.vocab_pad_multiple) == model.cfg
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(back[name], t), f"{name} changed on import"

    # HF folder -> trident checkpoint -> HF folder: the same files' tensors, the same config
    step = import_checkpoint(folder, tmp_path / "ckpts")
    assert step == tmp_path / "ckpts" / "step_0000000" and (tmp_path / "ckpts" / "latest").is_file()
    stored = ckpt.full_tensors(step)
    assert stored.keys() == tensors.keys() and all(torch.equal(stored[n], t) for n, t in tensors.items())
    again = export_checkpoint(tmp_path / "ckpts", tmp_path / "again")
    first, second = read_safetensors(folder), read_safetensors(again.output)
    assert first.keys() == second.keys() and all(torch.equal(first[n], second[n]) for n in first)
    assert json.loads((again.output / "config.json").read_text()) == json.loads((folder / "config.json").read_text())
    assert (again.output / "tokenizer.json").read_text() == (folder / "tokenizer.json").read_text()


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_transformers_loads_the_export_with_our_logits(variant, exported):
    model, _, folder = exported[variant]
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    expected = "GPT2LMHeadModel" if variant == "gpt2" else "LlamaForCausalLM"
    assert type(hf).__name__ == expected
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    x = _tokens()
    with torch.no_grad():
        ours = model.full_logits(model(x))
        theirs = hf.eval()(x).logits
    assert torch.allclose(ours, theirs, atol=ATOL, rtol=0), (ours - theirs).abs().max()


def test_large_exports_are_sharded_with_an_index(exported, tmp_path):
    model, tensors, _ = exported["llama-gqa-untied"]
    folder = export_hf(model.cfg, tensors, tmp_path / "sharded", max_shard_bytes=60_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and not (folder / "model.safetensors").exists()
    for f in files:  # at most the limit, or one tensor larger than the limit on its own
        names = [n for n, where in index["weight_map"].items() if where == f]
        assert sum(tensors_bytes(folder / f).values()) <= 60_000 or len(names) == 1, (f, names)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    x = _tokens()
    with torch.no_grad():
        assert torch.allclose(model.full_logits(model(x)), hf(x).logits, atol=ATOL, rtol=0)
    cfg, back = import_hf(folder)
    assert all(torch.equal(back[n], t) for n, t in tensors.items())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_models_saved_by_transformers_import_with_their_logits(arch, tmp_path):
    torch.manual_seed(0)
    if arch == "llama":
        config = transformers.LlamaConfig(
            vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=64, rope_theta=20000.0,
        )
        hf = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=97, n_embd=48, n_layer=2, n_head=4, n_positions=64,
                                         bos_token_id=0, eos_token_id=0)
        hf = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "hf")
    assert not list((tmp_path / "hf").glob("*.bin"))
    step = import_checkpoint(tmp_path / "hf", tmp_path / "ckpts")
    from trident.inference.generate import load_model

    model, _ = load_model(step)
    x = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.full_logits(model(x))
        theirs = hf.eval()(x).logits
    assert torch.allclose(ours, theirs, atol=ATOL, rtol=0), (ours - theirs).abs().max()


def test_autotokenizer_encodes_like_our_tokenizer(exported, tokenizer):
    from hf_helpers import stdlib_texts

    from trident.data.tokenizer import load_tokenizer

    ours = load_tokenizer(tokenizer)
    theirs = transformers.AutoTokenizer.from_pretrained(exported["llama-gqa-untied"][2])
    texts = [
        "def f(x):\n    return  x + 1\n", "  two leading spaces", " ", "", "tabs\tand\n\n\nnewlines   ",
        "héllo wörld ✓ 中文 🙂", "12345 and 3.14", *(t[:3000] for t in stdlib_texts(6, start=60)),
    ]
    for text in texts:
        ids = ours.encode(text)
        assert theirs(text).input_ids == ids, f"encoding differs for {text[:40]!r}"
        assert theirs.decode(ids) == ours.decode(ids), f"decoding differs for {text[:40]!r}"
    assert theirs.eos_token_id == ours.eod_id and theirs.bos_token_id == ours.bos_id


@pytest.mark.parametrize(
    "change, feature",
    [
        ({"position": "alibi"}, "ALiBi"),
        ({"norm_position": "post"}, "post-norm"),
        ({"qk_norm": True}, "QK-norm"),
        ({"activation": "gelu"}, "RoPE with gelu"),
        ({"position": "none"}, "without position encoding"),
    ],
)
def test_unrepresentable_configs_are_refused_naming_the_feature(change, feature, tmp_path):
    cfg = dataclasses.replace(CONFIGS["llama-gqa-untied"], **change)
    model = tiny_model(cfg)
    with pytest.raises(UserError, match=feature):
        export_hf(cfg, gather_checked(model, None), tmp_path / "out")
    assert not (tmp_path / "out").exists(), "nothing may be written for a refused export"


def test_export_command_refuses_alibi_and_names_it(tmp_path, capsys):
    from trident.tools.cli import main

    cfg = dataclasses.replace(CONFIGS["llama-gqa-untied"], position="alibi")
    write_checkpoint(tiny_model(cfg), tmp_path / "ckpts", tokenizer=None)
    assert main(["export", "--checkpoint", str(tmp_path / "ckpts"), "--format", "hf", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "ALiBi" in err and "model.position='alibi'" in err and not (tmp_path / "o").exists()


def test_export_and_import_commands(exported, tokenizer, tmp_path, capsys):
    """The CLI path: a run's checkpoint (tokenizer recorded) exported; the export imported."""
    from trident.tools.cli import main

    model, tensors, _ = exported["gpt2"]
    write_checkpoint(model, tmp_path / "run" / "checkpoints", tokenizer=tokenizer)
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "hf"), "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "GPT2LMHeadModel" in out and "tokenizer.json" in out and "model.safetensors" in out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert main(["import", "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "imported")]) == 0
    back = ckpt.full_tensors(ckpt.find_checkpoint(tmp_path / "imported"))
    for name, t in tensors.items():
        assert torch.equal(back[name], t.to(torch.bfloat16).float()), name
    assert (tmp_path / "imported" / "tokenizer.model").read_bytes() == Path(tokenizer).read_bytes()
    # user mistakes: one sentence, exit code 2
    assert main(["import", "--hf", str(tmp_path / "missing"), "--output", str(tmp_path / "x")]) == 2
    assert main(["import", "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "imported")]) == 2
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "y"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "already holds checkpoints" in err and "valid formats are hf" in err


# --- an imported checkpoint at other layouts (2 gloo ranks) -----------------------------------
def _load_imported_at_tp2_and_pp2(step: str, variant: str) -> dict:
    from hf_helpers import CONFIGS

    from trident.model.gpt import GPT
    from trident.model.stage import build_stage
    from trident.parallel.tensor.sharding import global_shapes
    from trident.parallel.topology import Topology

    cfg = CONFIGS[variant]
    stored = ckpt.full_tensors(step)
    x = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    single = GPT(cfg, Topology.single())
    ckpt.load_model(step, single)
    with torch.no_grad():
        ref = single.eval().full_logits(single(x))

    topo = Topology.from_initialized(tp=2)
    model = GPT(cfg, topo)
    ckpt.load_model(step, model)
    tp_exact = all(torch.equal(t, stored[n]) for n, t in gather_checked(model, topo.tp_group).items())
    with torch.no_grad():
        tp_err = (model.eval().full_logits(model(x)) - ref).abs().max().item()

    topo = Topology.from_initialized(pp=2)
    stage = build_stage(cfg, topo)
    ckpt.load_model(step, stage)
    pp = gather_checked(stage, topo.pp_group, names=global_shapes(single))
    pp_exact = all(torch.equal(t, stored[n]) for n, t in pp.items())
    return {"tp_exact": tp_exact, "tp_logits_err": tp_err, "pp_exact": pp_exact}


@pytest.mark.parametrize("variant", ["llama-gqa-untied", "llama-tied-bias"])
def test_imported_checkpoint_loads_at_tp2_and_pp2(variant, exported, tmp_path, dist_pool):
    step = import_checkpoint(exported[variant][2], tmp_path / "ckpts")
    for res in dist_pool.run(2, "test_hf:_load_imported_at_tp2_and_pp2", step=str(step), variant=variant):
        assert res["tp_exact"] and res["pp_exact"], res
        assert res["tp_logits_err"] < ATOL, res
