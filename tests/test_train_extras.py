"""The plain PyTorch reference model, `trident bench train`, `trident plot`, early stopping."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from cli_helpers import CONFIG, TINY, trident
from trident.model.config import PRESETS
from trident.model.reference import ReferenceGPT
from trident.parallel.tensor.sharding import gather_full
from trident.parallel.topology import Topology
from trident.parallel.pipeline.executor import build_stage

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
    ref.load_trident(gather_full(model, None))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (2, 32), generator=g)
    ours = model(tokens, labels).mean()
    theirs = ref(tokens, labels)
    ours.backward()
    theirs.backward()
    assert abs(ours.item() - theirs.item()) <= 1e-6 * abs(theirs.item())
    grads = gather_full(model, None, grads=True)
    pairs = {"blocks.1.q.weight": "layers.1.attn.qkv.q.weight", "blocks.0.down.weight": "layers.0.mlp.proj.weight",
             "blocks.0.norm1.weight": "layers.0.norm1.weight"}
    mine = dict(ref.named_parameters())
    for theirs_name, ours_name in pairs.items():
        torch.testing.assert_close(mine[theirs_name].grad, grads[ours_name], rtol=1e-4, atol=1e-7)


def test_reference_refuses_what_it_cannot_express():
    cfg = dataclasses.replace(PRESETS["tiny"], position="alibi")
    with pytest.raises(ValueError, match="no 'alibi' positions; it supports rope and learned"):
        ReferenceGPT(cfg)


BENCH = ["bench", "train", "--config", str(CONFIG), "--steps", "2", "--warmup", "1", *TINY]


def _figures(out: str, row: str) -> list[float]:
    line = next(line for line in out.splitlines() if line.startswith("  " + row))
    return [float(x.rstrip("%")) for x in line.split()[-4:]]


def test_bench_train_prints_trident_and_reference_figures():
    out = trident(*BENCH).stdout
    step_s, tokens_per_s, tflops, mfu = _figures(out, "trident ")
    assert step_s > 0 and tflops > 0 and mfu > 0
    # global batch 8 x seq 32; step_s is printed to 4 decimals and tokens/s to units, so the
    # printed figures agree within what that rounding allows (fast steps are ~20 ms here)
    assert 8 * 32 / (step_s + 5e-5) - 0.5 <= tokens_per_s <= 8 * 32 / (step_s - 5e-5) + 0.5
    ref = _figures(out, "plain PyTorch reference")
    ratio = float(re.search(r"trident / reference throughput: ([0-9.]+)x", out).group(1))
    assert ratio == pytest.approx(tokens_per_s / ref[1], abs=0.01)
    assert "layout tp=1 pp=1 dp=1 (world 1)" in out


def test_bench_train_on_several_ranks():
    out = trident(*BENCH, "--nproc", "2", "--pp", "2", "--no-reference").stdout
    assert "layout tp=1 pp=2 dp=1 (world 2)" in out
    assert _figures(out, "trident ")[1] > 0
    assert "reference" not in out.split("layout")[1].split("peak")[0]


def test_plot_writes_a_png(tmp_path):
    records = [{"step": s, "loss": 5.0 / s, "lr": 1e-3 * s} for s in range(1, 11)]
    records += [{"step": 5, "val_loss": 1.2, "val_ppl": 3.3}, {"step": 10, "val_loss": 0.9, "val_ppl": 2.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    trident("plot", str(tmp_path))
    png = (tmp_path / "curves.png").read_bytes() if (tmp_path / "curves.png").exists() else None
    assert png is not None and png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_plot_of_an_empty_run_dir_is_a_clear_error(tmp_path):
    proc = trident("plot", str(tmp_path), check=False)
    assert proc.returncode == 2 and "metrics.jsonl" in proc.stderr


def test_early_stopping_on_a_validation_loss_that_does_not_improve(data_dir, tmp_path):
    # lr 1e-12 leaves the fp32 weights (all but) unchanged: the validation loss stops improving
    proc = trident("train", "--config", str(CONFIG), "--run-dir", str(tmp_path), *TINY, "train.steps=10",
                   "optim.lr=1e-12", "optim.min_lr=0", "eval.interval=2", "eval.patience=2", "checkpoint.interval=-1",
                   f"data.work_dir={data_dir}")
    vals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    vals = [(r["step"], r["val_loss"]) for r in vals if "val_loss" in r]
    # the rule: stop at the evaluation that makes `patience` in a row without a new best
    best, bad, expected = float("inf"), 0, None
    for step, val in vals:
        best, bad = (val, 0) if val < best else (best, bad + 1)
        if bad >= 2:
            expected = step
            break
    assert expected is not None and expected < 10, vals
    assert f"done: {expected} steps (early_stopping)" in proc.stdout
    assert vals[-1][0] == expected  # no evaluation after the stop, and no extra final one


def test_tensorboard_events_mirror_the_metrics_file(data_dir, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                            reason="the tensorboard extra is not installed")
    trident("train", "--config", str(CONFIG), "--run-dir", str(tmp_path), *TINY, "train.steps=3",
            "log.tensorboard=true", "checkpoint.interval=-1", f"data.work_dir={data_dir}")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    logged = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert logged == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records if "loss" in r]
    assert {"lr", "grad_norm", "tokens_per_s", "mfu", "val_loss"} <= set(acc.Tags()["scalars"])


def test_demo_trains_checkpoints_and_prints_a_sample(data_dir, tmp_path):
    """The README's main command, shrunk: the same path (launch, train, checkpoint, sample)."""
    run = tmp_path / "demo"
    proc = trident("demo", "--nproc", "2", "--tp", "1", "--pp", "2", "--run-dir", str(run), "--max-new-tokens", "8",
                   *TINY, "train.steps=4", "checkpoint.interval=0", f"data.work_dir={data_dir}")
    assert "on 2 local ranks (tp=1, pp=2, dp=1)" in proc.stdout
    assert json.loads((run / "checkpoints" / "latest").read_text())["step"] == 4
    sample = proc.stdout.split("(temperature 0.8, top-k 40):\n")[1].split("\n\nmetrics:")[0]
    assert sample.startswith("def ") and len(sample) > len("def ")


def test_a_non_finite_step_stops_with_its_number_or_is_skipped(data_dir, tmp_path):
    # weights of 1e30 overflow the backward in fp32 at the first step, deterministically
    args = ["train", "--config", str(CONFIG), *TINY, "train.steps=3", "checkpoint.interval=-1", "model.init_std=1e30",
            f"data.work_dir={data_dir}"]
    proc = trident(*args, "--run-dir", str(tmp_path / "stop"), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "trident train: error: step 1: the loss is" in proc.stderr and "train.nonfinite=skip" in proc.stderr
    assert "Traceback" not in proc.stderr
    trident(*args, "--run-dir", str(tmp_path / "skip"), "train.nonfinite=skip")
    records = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["stepped"] for r in steps] == [False, False, False]
    assert len({r["lr"] for r in steps}) == 1  # a skipped step does not advance the schedule


def test_slurm_script_builds_one_torchrun_per_node(tmp_path):
    """scripts/slurm.sbatch under fake `srun`/`scontrol`: the launch line it would run."""
    import os
    import subprocess

    from cli_helpers import REPO

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-node-07\\ngpu-node-08\\n'\n")
    (bin_dir / "srun").write_text("#!/bin/sh\necho \"srun $*\"\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-node-[07-08]",
               SLURM_NNODES="2", SLURM_GPUS_ON_NODE="4", SLURM_JOB_ID="123", SLURM_JOB_NAME="llama")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "slurm.sbatch"), "configs/llama-8b.yaml", "--tp", "4",
                           "train.steps=10"], capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    assert words[:2] == ["srun", "--kill-on-bad-exit=1"] and "torchrun" in words
    launch = " ".join(words)
    assert "--nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint gpu-node-07:29500 --rdzv-id 123" in launch
    assert launch.endswith("-m trident train --config configs/llama-8b.yaml --run-dir runs/llama train.device=cuda "
                           "--tp 4 train.steps=10")
    missing = subprocess.run(["bash", str(REPO / "scripts" / "slurm.sbatch")], capture_output=True, text=True,
                             env=env, timeout=30)
    assert missing.returncode != 0 and "usage: sbatch scripts/slurm.sbatch CONFIG" in missing.stderr
