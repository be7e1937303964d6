"""`trident train --dry-run`: one rank of a 1,024-rank job, built for real in one process.

Llama 3 8B at (tp, pp, dp) = (8, 4, 32) and Llama 3 70B at (8, 8, 16): for first, middle
and last ranks the counted parameter, gradient and optimizer bytes equal `trident plan`'s
exactly, a middle stage's parameter count equals the Llama shapes worked by hand, the ZeRO
shard is 1/dp of the buckets, the data loader hands the rank its dp share of a small
synthetic dataset (a two-dataset blend for 70B), and the checkpoint files are the ones a
real save writes. Mistakes get one sentence; the fake backend never outlives a dry run and
never starts inside a real job.
"""

from __future__ import annotations

import json

import data_fixtures
import numpy as np
import pytest
import torch.distributed as dist
from cli_helpers import REPO
from data_fixtures import write_synthetic

from trident.checkpoint.checkpoint import RunState, save_checkpoint
from trident.errors import UserError
from trident.parallel.random import RNGStreams
from trident.parallel.topology import Layout, Topology
from trident.planning.dry_run import dry_run, fake_world, format_report
from trident.tools.cli import main
from trident.training.build import build_model, build_optimizer
from trident.training.config import load_config

LLAMA_8B = str(REPO / "configs" / "llama-8b.yaml")
LLAMA_70B = str(REPO / "configs" / "llama-70b.yaml")
# the data tests' session fixtures: a small stdlib corpus and a 512-piece tokenizer trained on it
data_dir, stdlib_jsonl, sp_model = data_fixtures.data_dir, data_fixtures.stdlib_jsonl, data_fixtures.sp_model
MOE = ["model.moe_experts=8", "model.moe_top_k=2", "model.moe_ffn_hidden=24", "model.moe_layer_freq=2"]
SMALL = ["model.n_layers=3", "model.hidden=48", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=100",
         "model.max_seq_len=32", "data.seq_len=32", "model.vocab_size=1001", "data.vocab_size=1001",
         "train.micro_batch_size=1", "train.global_batch_size=20", "optim.bucket_mb=0.01"]


@pytest.fixture(scope="module")
def data(data_dir, sp_model) -> list[str]:
    """Two synthetic datasets (~1.5M tokens each) and the overrides that point a run at them:
    two steps of 1,024 samples of 8,192 tokens are ~11 epochs of the training split."""
    rng = np.random.default_rng(19)
    prefixes = [str(data_dir / f"dry{i}") for i in range(2)]
    for prefix in prefixes:
        write_synthetic(prefix, rng.integers(1, 2000, size=1500))
    return [f"data.tokenizer={sp_model}", "train.steps=2", "eval.iters=1", "data.split=98,2,0", *prefixes]


def _overrides(data: list[str], blend: bool) -> list[str]:
    *keys, a, b = data
    return [*keys, f"data.prefix=[{a},{b}]" if blend else f"data.prefix=[{a}]"]


def _layer_numel(hidden: int, heads: int, kv_heads: int, ffn: int, tp: int) -> int:
    """One Llama block's parameters on one tp rank, from the shapes: q, k, v; out; SwiGLU; 2 norms."""
    head_dim = hidden // heads
    qkv = (heads // tp + 2 * kv_heads // tp) * head_dim * hidden
    return qkv + hidden * (hidden // tp) + 2 * (ffn // tp) * hidden + hidden * (ffn // tp) + 2 * hidden


def _check_rank(report, layout: Layout, rank: int, gbs: int) -> None:
    pp_rank, dp_rank, tp_rank = layout.coords(rank)
    assert report.coords == {"tp": tp_rank, "cp": 0, "pp": pp_rank, "dp": dp_rank, "ep": 0}
    assert report.mismatches == {}, report.mismatches
    assert set(report.built) >= {"param_bytes", "grad_bytes", "optimizer_bytes"}
    built = report.built
    # ZeRO-1 across dp: this rank's state is 1/dp of every (padded) bucket, in fp32 x3 (master, m, v)
    assert report.shard_numel * layout.dp == built["padded_numel"]
    assert built["optimizer_bytes"] == 12 * report.shard_numel
    assert built["param_bytes"] == 2 * built["padded_numel"]  # bf16
    files = {f"optim_rank{rank}.safetensors", f"rng_rank{rank}.safetensors"}
    files |= {f"model_pp{pp_rank}_tp{tp_rank}.safetensors"} if dp_rank == 0 else set()
    assert set(report.checkpoint_files) == files
    d = report.data
    m = gbs // layout.dp
    assert d["microbatches"] == m and d["micro_batch_size"] == 1
    assert d["first_step_indices"] == np.arange(gbs).reshape(m, layout.dp)[:, dp_rank].tolist()
    assert d["train_samples"] >= 2 * gbs and d["first_sample_tokens"] == 8192
    assert not dist.is_initialized()  # the fake group is gone


@pytest.mark.parametrize("rank", [0, 517, 1023])
def test_llama_8b_at_1024_ranks_matches_the_plan(data, rank):
    cfg = load_config(LLAMA_8B, ["parallel.pp=4", *_overrides(data, blend=False)])
    report = dry_run(cfg, 1024, rank, LLAMA_8B)
    assert report.layout == {"tp": 8, "cp": 1, "pp": 4, "dp": 32, "ep": 1}
    _check_rank(report, Layout(tp=8, pp=4, dp=32), rank, 1024)
    if report.coords["pp"] == 2:  # a middle stage: 8 blocks and nothing else
        assert report.layers == list(range(16, 24))
        assert report.built["numel"] == 8 * _layer_numel(4096, 32, 8, 14336, tp=8) == 218_169_344


@pytest.mark.parametrize("rank", [0, 600, 1023])
def test_llama_70b_at_1024_ranks_matches_the_plan(data, rank):
    cfg = load_config(LLAMA_70B, _overrides(data, blend=True))
    report = dry_run(cfg, 1024, rank, LLAMA_70B)
    assert report.layout == {"tp": 8, "cp": 1, "pp": 8, "dp": 16, "ep": 1}
    _check_rank(report, Layout(tp=8, pp=8, dp=16), rank, 1024)
    if 0 < report.coords["pp"] < 7:
        assert report.built["numel"] == 10 * _layer_numel(8192, 64, 8, 28672, tp=8) == 1_069_711_360


@pytest.mark.parametrize("world, rank, extra", [
    (20, 13, ["parallel.tp=2", "parallel.pp=2"]),  # dp=5: buckets padded to multiples of 80
    (30, 29, ["parallel.tp=2", "parallel.pp=3", "model.tie_embeddings=true", "optim.zero=2",
              "train.global_batch_size=30", "train.dtype=fp32"]),
    (10, 9, ["parallel.tp=2", "optim.zero=3", "model.position=learned", "model.norm=layernorm", "model.bias=true",
             "model.activation=gelu"]),
    (40, 22, ["parallel.tp=2", "parallel.pp=2", "parallel.cp=2", "optim.zero=0"]),
    # experts: 8 per MoE layer (every other block) over ep=4 of dp=8, their buckets over dp/ep = 2
    (32, 27, [*MOE, "parallel.tp=2", "parallel.pp=2", "parallel.ep=4", "parallel.sequence_parallel=true",
              "train.global_batch_size=16", "optim.zero=2"]),
    (8, 3, [*MOE, "parallel.ep=2", "train.global_batch_size=16"]),  # one stage: MoE 0, 2, dense 1; experts 1/4 shards
])
def test_planner_agrees_at_other_layouts_and_stages(world, rank, extra):
    report = dry_run(load_config(None, SMALL + extra), world, rank)
    assert report.mismatches == {}, report.mismatches
    assert report.data is None and any("data.prefix" in n for n in report.notes)
    if world == 20:
        assert report.built["padded_numel"] > report.built["numel"]  # the planner rounds padding as the buffer does
    if world == 32:  # rank 27: stage 1, dp rank 5 = ep rank 1 (experts 2, 3 of 8 in MoE layer 2)
        assert report.coords == {"tp": 1, "cp": 0, "pp": 1, "dp": 5, "ep": 1} and report.layers == [2]
        assert "ep 1/4" in format_report(report) and "experts' 1/2" in format_report(report)


def test_checkpoint_names_are_those_a_real_save_writes(tmp_path):
    cfg = load_config(None, SMALL)
    topo = Topology.single()
    rng = RNGStreams(cfg.train.seed, topo)
    model = build_model(cfg, topo, rng)
    ckpt = save_checkpoint(tmp_path, 1, topo, model, build_optimizer(cfg, model, topo), rng, RunState())
    saved = {p.name for p in ckpt.iterdir() if p.suffix == ".safetensors"}
    assert set(dry_run(cfg, 1, 0).checkpoint_files) == saved == {
        "model_pp0_tp0.safetensors", "optim_rank0.safetensors", "rng_rank0.safetensors"}


@pytest.mark.parametrize("argv, sentence", [
    (["--world", "1000", "--rank", "0"], "world size 1000 is not divisible by tp*pp = 8*4 = 32"),
    (["--world", "1024", "--rank", "1024"], "--rank 1024 is outside a world of 1024 ranks; valid ranks are 0..1023"),
    (["--world", "1024"], "--dry-run needs --rank"),
    (["--world", "1024", "--rank", "0", "--dp", "16"], "dp=16 disagrees with world size 1024"),
    (["--world", "1024", "--rank", "0", "--nproc", "2"], "drop --nproc"),
])
def test_a_bad_world_rank_or_layout_gets_one_sentence(capsys, argv, sentence):
    assert main(["train", "--config", LLAMA_8B, "--pp", "4", "--dry-run", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert sentence in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_dry_run_flags_without_dry_run_are_refused(capsys):
    assert main(["train", "--config", LLAMA_8B, "--world", "1024", "--rank", "3"]) == 2
    assert "--world and --rank describe a dry run; add --dry-run" in capsys.readouterr().err


def test_the_fake_backend_never_joins_a_real_job(tmp_path, monkeypatch):
    cfg = load_config(None, SMALL + ["parallel.tp=2"])
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match="launcher variables"):
        dry_run(cfg, 10, 1)
    monkeypatch.delenv("RANK")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(UserError, match="already belongs to a job of 1 ranks"):
            with fake_world(10, 1):
                pass
        assert dist.get_backend() == "gloo"
    finally:
        dist.destroy_process_group()


def test_cli_json_for_llama_70b(data, capsys):
    argv = ["train", "--config", LLAMA_70B, "--dry-run", "--world", "1024", "--rank", "1023", "--json"]
    assert main([*argv, *_overrides(data, blend=True)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mismatches"] == {} and report["layout"] == {"tp": 8, "cp": 1, "pp": 8, "dp": 16, "ep": 1}
    assert report["built"]["optimizer_bytes"] == report["planned"]["optimizer_bytes"] > 0
    assert report["checkpoint_files"] == ["optim_rank1023.safetensors", "rng_rank1023.safetensors"]
    assert set(report["times"]) == {"topology_s", "model_s", "optimizer_s", "index_s"}
