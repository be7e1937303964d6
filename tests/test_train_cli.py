"""`trident train` end to end, through the command line, at several layouts.

One small llama-style config trains for 10 steps at (tp, pp, dp) = (1,1,1), (1,2,1) and
(2,2,2) on the stdlib corpus; every layout must log the same loss at
every step (fp32, dropout 0). Also: the metrics file, config rejection, SIGTERM, and a
two-"node" torchrun launch on localhost.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import CONFIG, TIMEOUT, TINY, losses, trident
from trident.model.config import ModelConfig
from trident.model.gpt import GPT
from trident.parallel.topology import Topology


@pytest.fixture(scope="session")
def reference_run(data_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run-1-1-1")
    proc = trident("train", "--config", str(CONFIG), "--run-dir", str(run), *TINY, "train.steps=10",
                   f"data.work_dir={data_dir}")
    (run / "stdout.txt").write_text(proc.stdout)  # for test_start_of_run_summary
    return run


# tp, pp and dp each equal one process in the library tests (test_tp/pipeline/zero_equivalence);
# through the command line: a pipeline alone, and all three composed
@pytest.mark.parametrize("tp, pp, dp", [(1, 2, 1), (2, 2, 2)])
def test_every_layout_logs_the_same_losses(reference_run, data_dir, tmp_path, tp, pp, dp):
    world = tp * pp * dp
    # recording the timeline must not change a loss; (2,2,2) asks for step 7, (1,2,1) takes the default
    timeline = ["log.timeline=true", *(["log.timeline_step=7"] if dp > 1 else [])] if pp > 1 else []
    proc = trident("train", "--config", str(CONFIG), "--nproc", str(world), "--tp", str(tp), "--pp", str(pp),
            "--run-dir", str(tmp_path), *TINY, "train.steps=10", *timeline, f"data.work_dir={data_dir}")
    ref, got = losses(reference_run), losses(tmp_path)
    assert len(ref) == len(got) == 10
    for step, (a, b) in enumerate(zip(got, ref), start=1):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: loss {a} at (tp={tp}, pp={pp}, dp={dp}) vs {b} at (1,1,1)"
    assert ref[-1] < ref[0]  # and it learns
    if timeline:
        events = [e for e in json.loads((tmp_path / "timeline.json").read_text())["traceEvents"] if e["ph"] == "X"]
        micro = 8 // (2 * dp)  # global batch 8, micro batch 2: microbatches per dp rank
        for rank in range(world):  # every rank ran one forward and one backward per microbatch
            mine = [e for e in events if e["tid"] == rank]
            assert sorted(e["args"]["microbatch"] for e in mine if e["cat"] == "forward") == list(range(micro))
            assert sorted(e["args"]["microbatch"] for e in mine if e["cat"] == "backward") == list(range(micro))
        assert (tmp_path / "timeline.png").read_bytes().startswith(b"\x89PNG")
        _check_timeline_figures(tmp_path, proc.stdout, step=7 if dp > 1 else 3, tp=tp, dp=dp, micro=micro, world=world)


def _check_timeline_figures(run: Path, stdout: str, step: int, tp: int, dp: int, micro: int, world: int) -> None:
    """The trace's metadata and the log line carry the step (the default: the first after a
    2-step warm-up), real busy shares, and measured vs theoretical bubble (1/(m+1) at p=2)."""
    trace = json.loads((run / "timeline.json").read_text())
    meta, spans = trace["otherData"], [e for e in trace["traceEvents"] if e["ph"] == "X"]
    lowest = sorted({min(e["tid"] for e in spans if e["pid"] == s) for s in (0, 1)})
    assert (meta["step"], meta["stages"], meta["microbatches"], meta["tp"], meta["dp"]) == (step, 2, micro, tp, dp)
    assert meta["drawn_ranks"] == lowest and len(lowest) == 2 and world == 2 * tp * dp
    assert meta["theoretical_bubble"] == 1 / (micro + 1) and 0 <= meta["measured_bubble"] < 1
    assert meta["step_time_s"] > 0 and all(0 < b <= 1 for b in meta["busy_share"].values())
    line = next(x for x in stdout.splitlines() if x.startswith("pipeline timeline of step"))
    assert line.startswith(f"pipeline timeline of step {step}: {run / 'timeline.json'}, {run / 'timeline.png'}")
    assert f"{meta['measured_bubble']:.1%} measured vs {1 / (micro + 1):.1%} theoretical" in line


def test_metrics_file_and_resolved_config(reference_run):
    records = [json.loads(line) for line in (reference_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "tflops", "mfu",
                "param_bytes", "grad_bytes", "optimizer_bytes", "mem_params_bytes", "mem_grads_bytes",
                "mem_optim_bytes", "mem_activation_peak_bytes", "mem_total_bytes", "mem_max_total_bytes"):
        assert all(key in r for r in train), key
    # every logged step is metered: a real activation peak, and the parts add up
    for r in train:
        parts = r["mem_params_bytes"] + r["mem_grads_bytes"] + r["mem_optim_bytes"] + r["mem_activation_peak_bytes"]
        assert r["mem_activation_peak_bytes"] > 0 and r["mem_total_bytes"] == parts == r["mem_rank_total_bytes"][0]
        assert r["mem_params_bytes"] == r["param_bytes"] and r["mem_activation_source"] == "saved-tensors"
    assert [r["step"] for r in train] == list(range(1, 11))
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [5, 10] and all(r["val_ppl"] > 1 for r in val)
    resolved = json.loads((reference_run / "config.json").read_text())
    assert set(resolved["derived"]) == {"world", "dp", "microbatches_per_step", "tokens_per_step", "parameters",
                                        "flops_per_step", "peak_tflops_per_device", "peak_source"}
    assert resolved["derived"]["dp"] == 1 and resolved["derived"]["microbatches_per_step"] == 4
    assert resolved["derived"]["tokens_per_step"] == 8 * 32 and resolved["train"]["steps"] == 10
    # warm-up then cosine: lr rises for 2 steps, then falls
    lrs = [r["lr"] for r in train]
    assert lrs[0] < lrs[1] and all(b <= a for a, b in zip(lrs[1:], lrs[2:]))


def _summary(stdout: str) -> dict[str, str]:
    """The start-of-run summary's `key: value` lines, by key."""
    rows = {}
    for line in stdout.split("trident train (the whole resolved config: ")[1].splitlines()[1:]:
        if not line.startswith("  "):
            break
        key, value = line.split(": ", 1)
        rows[key.strip()] = value.strip()
    assert 10 <= len(rows) <= 16  # a dozen lines or so
    return rows


def test_start_of_run_summary(reference_run):
    """A dozen lines of real values instead of the whole JSON (still in config.json)."""
    stdout = (reference_run / "stdout.txt").read_text()
    resolved = json.loads((reference_run / "config.json").read_text())
    model = GPT(ModelConfig(**resolved["model"]), Topology.single())
    params = sum(p.numel() for p in model.parameters())
    assert params == resolved["derived"]["parameters"]
    got = _summary(stdout)
    assert "resolved config:\n" not in stdout and '"derived"' not in stdout
    assert got["layout"] == "tp=1 pp=1 dp=1 (world 1), sequence parallel off"
    assert got["parameters"].startswith(f"{params:,} (") and f"; {params:,} on this rank (rank 0" in got["parameters"]
    assert got["tokens/step"] == f"{8 * 32:,} (8 sequences x 32 tokens)"
    assert got["microbatches/step"] == "4 per dp rank, 2 sequences each"
    assert got["FLOPs/step"].startswith(f"{resolved['derived']['flops_per_step']:.3e} (")
    assert (got["dtype"], got["ZeRO stage"], got["recompute"]) == ("fp32", str(resolved["optim"]["zero"]), "none")
    assert got["data"].startswith("stdlib corpus (") and got["tokenizer"].endswith("(trained on the stdlib corpus)")
    assert got["run dir"] == str(reference_run) and got["start"].startswith("fresh")
    assert got["steps"] == "0 -> 10"


def test_a_data_error_is_printed_once_for_all_ranks(data_dir, tmp_path):
    tokenizer = next(data_dir.glob("stdlib-sp*.model"))
    proc = trident("train", "--config", str(CONFIG), "--nproc", "2", "--run-dir", str(tmp_path), *TINY,
                   "data.prefix=/nonexistent/x", f"data.tokenizer={tokenizer}", check=False, timeout=180)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "/nonexistent/x.idx" in line]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("trident train: error: indexed dataset file /nonexistent/x.idx does not exist")
    assert "(rank" in lines[0]


@pytest.mark.parametrize(
    "args, words",
    [
        (["train.stepz=3"], "unknown config key train.stepz; valid keys in train are"),
        (["optim.schedule=exp"], "optim.schedule is 'exp'; valid values are cosine, linear, constant, wsd"),
        (["--nproc", "3", "--tp", "2"], "world size 3 is not divisible by tp*pp = 2*1 = 2"),
    ],
)
def test_bad_config_is_rejected_before_any_rank_starts(tmp_path, args, words):
    proc = trident("train", "--config", str(CONFIG), "--run-dir", str(tmp_path), *args, check=False, timeout=120)
    assert proc.returncode == 2
    assert words in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_sigterm_stops_cleanly_with_a_checkpoint(data_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "trident", "train", "--config", str(CONFIG), "--run-dir", str(tmp_path), *TINY,
           "train.steps=100000", "checkpoint.interval=0", "eval.interval=0", f"data.work_dir={data_dir}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]  # 128 + SIGTERM: a requested stop, as `--nproc N` exits
    assert f"trident train: stopped by SIGTERM; latest checkpoint {tmp_path / 'checkpoints'}" in err
    steps = [r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
    assert len(steps) >= 2 and steps == list(range(1, len(steps) + 1))  # every step up to the stop, once
    assert f"done: {steps[-1]} steps (signal)" in out
    latest = json.loads((tmp_path / "checkpoints" / "latest").read_text())
    assert latest["step"] == steps[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_torchrun_on_localhost(data_dir, reference_run, tmp_path):
    """Two torchrun agents (--nnodes 2), one rank each, meet at a c10d rendezvous: dp=2."""
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    nodes = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "trident-test",
               "-m", "trident", "train", "--config", str(CONFIG), "--run-dir", str(tmp_path), *TINY,
               "train.steps=10", f"data.work_dir={data_dir}", "--print-config"]
        nodes.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outs = [n.communicate(timeout=TIMEOUT) for n in nodes]
    for n, (out, err) in zip(nodes, outs):
        assert n.returncode == 0, err[-4000:]
    got, ref = losses(tmp_path), losses(reference_run)
    assert len(got) == 10 and all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got, ref))
    text = (tmp_path / "config.json").read_text()
    assert json.loads(text)["derived"]["world"] == 2
    # --print-config: rank 0 (on whichever node) prints config.json's text whole, then the summary
    printed = [out for out, _ in outs if "resolved config:\n" in out]
    assert len(printed) == 1 and "resolved config:\n" + text in printed[0]
    assert _summary(printed[0])["layout"] == "tp=1 pp=1 dp=2 (world 2), sequence parallel off"
