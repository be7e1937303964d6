"""Run configs, LR schedules and the FLOPs formula: pure functions, no processes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from trident.errors import UserError
from trident.model.config import preset
from trident.training.config import TrainSection, derive, field_docs, load_config
from trident.training.lr_schedule import LRSchedule
from trident.training.metrics import flops_per_token

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize(
    "name, params, steps, tokens_per_step",
    [
        ("demo", 1_311_872, 300, 16 * 128),
        ("gpt2-124m", 124_439_808, 19_073, 512 * 1024),  # nanoGPT's run: ~0.5M tokens a step, 10B in all
        ("llama-1b", 1_235_814_400, 100_000, 512 * 4096),
        ("llama-8b", 8_030_261_248, 100_000, 1024 * 8192),
    ],
)
def test_presets_load_and_validate(name, params, steps, tokens_per_step):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.model.num_parameters() == params  # the model the file is named after
    derived = derive(cfg, cfg.parallel.tp * cfg.parallel.pp)
    assert (cfg.train.steps, derived.dp, derived.tokens_per_step) == (steps, 1, tokens_per_step)
    assert cfg.data.seq_len <= cfg.model.max_seq_len


def test_demo_divides_for_every_layout_up_to_4():
    cfg = load_config(CONFIGS / "demo.yaml")  # global batch 16, micro batch 4, seq 128
    layouts = 0
    for tp in (1, 2, 4):
        for pp in (1, 2, 4):
            for dp in (1, 2, 4):
                if tp * pp * dp <= 16:
                    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp = tp, pp, dp
                    d = derive(cfg, tp * pp * dp)
                    assert (d.dp, d.microbatches, d.tokens_per_step) == (dp, 4 // dp, 16 * 128), (tp, pp, dp)
                    layouts += 1
    assert layouts == 27 - 4  # all but the three layouts of 32 ranks and the one of 64


def test_overrides_are_typed_and_applied():
    cfg = load_config(CONFIGS / "demo.yaml", ["train.steps=7", "optim.lr=1e-3", "parallel.pp_split=[1, 3]", "model.n_kv_heads=null"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 1e-3 and cfg.parallel.pp_split == [1, 3]
    assert cfg.model.n_kv_heads is None


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.stepz=3", "unknown config key train.stepz; valid keys in train are steps, seed,"),
        ("trian.steps=3", "unknown config section 'trian' in 'trian.steps=3'; valid sections are model, train,"),
        ("train.steps=three", "train.steps must be a whole number, got 'three'"),
        ("optim.schedule=exp", "optim.schedule is 'exp'; valid values are cosine, linear, constant, wsd"),
        ("optim.zero=4", "optim.zero is 4; valid values are 0, 1, 2, 3"),
        ("train.dtype=fp8", "train.dtype is 'fp8'; valid values are fp32, bf16, fp16"),
        ("steps=3", "override 'steps=3' must look like section.key=value"),
        ("data.seq_len=4096", "data.seq_len=4096 exceeds model.max_seq_len=128"),
    ],
)
def test_bad_keys_and_values_are_rejected_by_name(override, words):
    with pytest.raises(UserError) as info:
        load_config(CONFIGS / "demo.yaml", [override])
    assert words in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        load_config(bad)


def test_layout_and_batch_mistakes_name_the_numbers():
    cfg = load_config(CONFIGS / "demo.yaml", ["train.global_batch_size=12", "train.micro_batch_size=4"])
    with pytest.raises(UserError, match=r"train.global_batch_size=12 is not a multiple of train.micro_batch_size x dp = 4 x 2 = 8"):
        derive(cfg, 2)
    cfg = load_config(CONFIGS / "demo.yaml", ["parallel.tp=3"])
    with pytest.raises(UserError, match="world size 8 is not divisible by tp\\*pp = 3\\*1 = 3"):
        derive(cfg, 8)
    cfg = load_config(CONFIGS / "demo.yaml")
    d = derive(cfg, 2)
    assert (d.dp, d.microbatches, d.tokens_per_step) == (2, 2, 16 * 128)


def test_field_docs_come_from_the_source():
    assert field_docs(TrainSection)["global_batch_size"].startswith("Sequences per optimizer step")


def test_schedules():
    cos = LRSchedule(1.0, 0.1, warmup_steps=10, total_steps=110, kind="cosine")
    assert cos.lr_at(5) == pytest.approx(0.5)
    assert cos.lr_at(10) == pytest.approx(1.0)
    assert cos.lr_at(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cos.lr_at(110) == pytest.approx(0.1)
    lin = LRSchedule(1.0, 0.0, 0, 100, "linear")
    assert lin.lr_at(50) == pytest.approx(0.5) and lin.lr_at(100) == pytest.approx(0.0)
    const = LRSchedule(1.0, 0.0, 5, 100, "constant")
    assert const.lr_at(3) == pytest.approx(0.6) and const.lr_at(99) == 1.0
    wsd = LRSchedule(1.0, 0.1, 10, 100, "wsd", decay_fraction=0.2)
    assert wsd.lr_at(80) == 1.0 and wsd.lr_at(90) == pytest.approx(0.55) and wsd.lr_at(100) == pytest.approx(0.1)
    # only steps actually taken advance it
    assert cos.current == cos.lr_at(1)
    cos.advance()
    cos.advance()
    state = cos.state_dict()
    fresh = LRSchedule(1.0, 0.1, 10, 110)
    fresh.load_state_dict(state)
    assert fresh.current == cos.lr_at(3)


def test_flops_formula_matches_the_6n_rule_for_gpt2():
    cfg = preset("gpt2-124m")
    n_matmul = cfg.num_parameters(include_embedding=False) + cfg.vocab_size * cfg.hidden
    assert flops_per_token(cfg, 1024) == 6 * n_matmul + 12 * 12 * 768 * 1024
    # about 6 * 124M + attention: the figure nanoGPT's MFU estimate uses
    assert 0.85e9 < flops_per_token(cfg, 1024) < 0.9e9


def test_a_single_dataset_prefix_may_be_a_string():
    from trident.errors import UserError
    from trident.training.config import load_config

    cfg = load_config(None, ["data.prefix=/data/web_text_document"])
    assert cfg.data.prefix == ["/data/web_text_document"] and cfg.data.weights is None
    assert load_config(None, ["data.prefix=[/a, /b]", "data.weights=[1, 3]"]).data.prefix == ["/a", "/b"]
    with pytest.raises(UserError, match="data.weights must be a list"):
        load_config(None, ["data.prefix=/a", "data.weights=1"])
    with pytest.raises(UserError, match="log.timeline_step must be >= 0"):
        load_config(None, ["log.timeline_step=-1"])
