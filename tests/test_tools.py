"""The command-line tools around training: `trident bench train` (trident against the plain
PyTorch reference), `trident plot`, `trident demo`, and the SLURM launch script."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess

import pytest

from cli_helpers import CONFIG, REPO, TINY, trident

BENCH = ["bench", "train", "--config", str(CONFIG), "--steps", "2", "--warmup", "1", *TINY]


def _figures(out: str, row: str) -> list[float]:
    line = next(line for line in out.splitlines() if line.startswith("  " + row))
    return [float(x.rstrip("%")) for x in line.split()[-4:]]


def test_bench_train_prints_trident_reference_and_transformers_figures():
    out = trident(*BENCH).stdout
    step_s, tokens_per_s, tflops, mfu = _figures(out, "trident ")
    assert step_s > 0 and tflops > 0 and mfu > 0
    # global batch 8 x seq 32; step_s is printed to 4 decimals and tokens/s to units, so the
    # printed figures agree within what that rounding allows (fast steps are ~20 ms here)
    assert 8 * 32 / (step_s + 5e-5) - 0.5 <= tokens_per_s <= 8 * 32 / (step_s - 5e-5) + 0.5
    ref = _figures(out, "plain PyTorch reference")
    hf = _figures(out, "transformers LlamaForCausalLM (1 proc)")
    for row in (ref, hf):
        assert all(math.isfinite(x) and x > 0 for x in row)
    for row in (step_s, tokens_per_s, tflops, mfu), ref, hf:
        assert row[3] <= 100.0  # mfu, in percent
    ratio = float(re.search(r"trident / reference throughput: ([0-9.]+)x", out).group(1))
    hf_ratio = float(re.search(r"trident / transformers throughput: ([0-9.]+)x", out).group(1))
    assert ratio == pytest.approx(tokens_per_s / ref[1], abs=0.005)
    assert hf_ratio == pytest.approx(tokens_per_s / hf[1], abs=0.005)
    assert re.search(r"peak [0-9.]+ TFLOP/s per device \(measured CPU float32 matmul", out)
    assert "layout tp=1 pp=1 dp=1 (world 1)" in out


def test_bench_train_without_transformers_or_with_a_config_it_cannot_express():
    out = trident(*BENCH, "--no-transformers").stdout
    assert "transformers" not in out and _figures(out, "plain PyTorch reference")[1] > 0
    out = trident(*BENCH, "--no-reference", "model.position=alibi").stdout
    assert "transformers row skipped: ALiBi positions" in out
    assert "trident / transformers" not in out


def test_bench_train_on_several_ranks():
    out = trident(*BENCH, "--nproc", "2", "--pp", "2", "--no-reference").stdout
    assert "layout tp=1 pp=2 dp=1 (world 2)" in out
    assert _figures(out, "trident ")[1] > 0
    assert "reference" not in out.split("layout")[1].split("peak")[0]
    hf = _figures(out, "transformers LlamaForCausalLM (1 proc)")
    assert hf[1] > 0
    hf_ratio = float(re.search(r"trident / transformers throughput: ([0-9.]+)x", out).group(1))
    assert hf_ratio == pytest.approx(_figures(out, "trident ")[1] / hf[1], abs=0.005)


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


def test_demo_trains_checkpoints_and_prints_a_sample(data_dir, tmp_path):
    """The README's main command, shrunk: the same path (launch, train, checkpoint, sample)."""
    run = tmp_path / "demo"
    proc = trident("demo", "--nproc", "2", "--tp", "1", "--pp", "2", "--run-dir", str(run), "--max-new-tokens", "8",
                   *TINY, "train.steps=4", "checkpoint.interval=0", f"data.work_dir={data_dir}")
    assert "on 2 local ranks (tp=1, pp=2, dp=1)" in proc.stdout
    assert json.loads((run / "checkpoints" / "latest").read_text())["step"] == 4
    sample = proc.stdout.split("(temperature 0.8, top-k 40):\n")[1].split("\n\nmetrics:")[0]
    assert sample.startswith("def ") and len(sample) > len("def ")
    # the start-of-run summary, not the whole config; and at the end, the next commands for this run
    assert "layout:            tp=1 pp=2 dp=1 (world 2)" in proc.stdout and "resolved config:\n" not in proc.stdout
    nxt = proc.stdout.split("\nnext:\n")[1]
    assert f"  trident plot {run}\n" in nxt
    assert f"  trident generate --checkpoint {run}/checkpoints --prompt 'def '" in nxt
    assert f"--nproc 2 --tp 1 --pp 2 --run-dir {run} " in nxt and nxt.rstrip().endswith("train.steps=8")


def test_slurm_script_builds_one_torchrun_per_node(tmp_path):
    """scripts/slurm.sbatch under fake `srun`/`scontrol`: the launch line it would run."""
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


def test_bench_memory_prints_planner_measured_and_the_regather_trace(tmp_path, capsys):
    from trident.tools.cli import main

    args = ["bench", "memory", "--tp", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--ffn", "128",
            "--seq", "32", "--trace", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("  2 ")]
    assert [r[1] for r in rows] == ["no", "yes"]
    for r in rows:  # planner / measured pairs agree in every column
        cells = [c for c in " ".join(r[2:]).replace("/", " ").split()]
        pairs = list(zip(cells[0:14:2], cells[1:14:2]))
        assert all(a == b for a, b in pairs), r
    assert "sp_regather_wait" in out and "sp_weight_grad" in out
    trace = json.loads((tmp_path / "regather_tp2_rank0.json").read_text())
    assert any(e.get("name") == "sp_regather_wait" for e in trace["traceEvents"])
    assert main(["bench", "memory", "--tp", "3"]) == 2
    assert "--tp 3 must be >= 1 and divide --heads 8" in capsys.readouterr().err
