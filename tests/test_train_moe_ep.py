"""`trident train` with expert parallelism: runs at ep 2 and 4 log the losses of one process
(with pp under 1F1B and ZB-H1, sequence-parallel tp, recompute, ZeRO 0-3; bf16 close), checkpoints store every expert once
by global name, and a run saved at one ep resumes at another."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import CONFIG, TINY, assert_same_losses, records, trident

MOE = ["model.moe_experts=4", "model.moe_top_k=2", "model.moe_ffn_hidden=32", "model.moe_aux_loss_coef=0.01",
       "model.moe_bias_update_rate=0.01", "train.steps=6", "eval.interval=3"]


def _train(run: Path, data_dir: Path, *args: str) -> str:
    return trident("train", "--config", str(CONFIG), "--run-dir", str(run), *TINY, *MOE,
                   f"data.work_dir={data_dir}", *args).stdout


@pytest.fixture(scope="module")
def ref(data_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("moe-ref")
    _train(run, data_dir)
    return run


@pytest.mark.parametrize(
    "layout",
    [["--nproc", "4", "--pp", "2", "parallel.pp_schedule=zb-h1", "parallel.ep=2", "optim.zero=1"],
     ["--nproc", "4", "--tp", "2", "parallel.ep=2", "parallel.sequence_parallel=true", "train.recompute=full",
      "optim.zero=3"]],
    ids=["pp2-zbh1-dp2-ep2-zero1", "tp2-dp2-ep2-sp-recompute-zero3"],
)
def test_expert_parallel_trains_like_one_process(ref, data_dir, tmp_path, layout):
    _train(tmp_path, data_dir, *layout)
    assert_same_losses(tmp_path, ref, " ".join(layout))
    # the clipped global norm counts every expert once (experts held by other ep ranks included)
    assert records(tmp_path, "grad_norm") == pytest.approx(records(ref, "grad_norm"), rel=1e-5)
    assert all(b > 0 for b in records(tmp_path, "moe_a2a_bytes"))
    assert records(tmp_path, "moe_load_max.1") == pytest.approx(records(ref, "moe_load_max.1"))


def test_bf16_at_ep2_tracks_one_bf16_process(data_dir, tmp_path):
    """bf16 rounds differently when the rows are computed on other ranks in other groupings,
    so the check is closeness (the fp32 tests above are the exact ones)."""
    one, ep = tmp_path / "one", tmp_path / "ep"
    _train(one, data_dir, "train.dtype=bf16", "train.steps=3")
    _train(ep, data_dir, "--nproc", "2", "parallel.ep=2", "train.dtype=bf16", "train.steps=3")
    got, want = records(ep, "loss"), records(one, "loss")
    assert len(got) == len(want) == 3 and all(abs(a - b) <= 0.01 * b for a, b in zip(got, want)), (got, want)
    assert all(b > 0 for b in records(ep, "moe_a2a_bytes"))


def test_a_checkpoint_saved_at_ep4_resumes_at_pp2_ep2(ref, data_dir, tmp_path):
    _train(tmp_path, data_dir, "--nproc", "4", "parallel.ep=4", "optim.zero=0", "checkpoint.interval=2",
           "train.exit_interval=4")
    ckpt = tmp_path / "checkpoints" / "step_0000004"
    index = json.loads((ckpt / "index.json").read_text())
    holders = {}
    for file, slices in index["model"].items():
        for name in slices:
            holders.setdefault(name, []).append(file)
    experts = {n: f for n, f in holders.items() if ".experts." in n}
    assert len(experts) == 2 * 4 * 3 and all(len(f) == 1 for f in experts.values())  # every expert once
    assert holders["layers.0.mlp.experts.3.down.weight"] == ["model_pp0_tp0_ep3.safetensors"]
    assert json.loads((ckpt / "meta.json").read_text())["layout"]["ep"] == 4
    out = _train(tmp_path, data_dir, "--nproc", "4", "--pp", "2", "parallel.ep=2", "optim.zero=2")
    assert "(saved at tp=1 pp=1 dp=4 ep=4, resharded)" in out
    assert_same_losses(tmp_path, ref, "ep=4 zero 0 to step 4, then pp=2 ep=2 zero 2")


def test_bad_expert_layouts_are_one_sentence(data_dir, tmp_path):
    proc = trident("train", "--config", str(CONFIG), "--run-dir", str(tmp_path), *TINY, *MOE,
                   f"data.work_dir={data_dir}", "--nproc", "2", "parallel.ep=4", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "ep=4 does not divide dp=2" in proc.stderr
