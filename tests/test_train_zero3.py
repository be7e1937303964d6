"""`trident train` with optim.zero=3: runs log the losses of one process, checkpoints move
between ZeRO-3 and other stages and layouts (the format does not change), a resume at the
same layout is bitwise, and export and generation read a ZeRO-3 checkpoint unchanged.

The tiny config of test_train_cli, 6 steps, a checkpoint every 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import CONFIG, TINY, assert_same_losses, records, trident

STEPS = ["train.steps=6", "checkpoint.interval=2"]


def _train(run: Path, data_dir: Path, *args: str) -> str:
    return trident("train", "--config", str(CONFIG), "--run-dir", str(run), *TINY, *STEPS,
                   f"data.work_dir={data_dir}", *args).stdout


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory) -> dict[str, Path]:
    """One process at ZeRO-1, and ZeRO-3 over dp=2, uninterrupted."""
    out = {"ref": tmp_path_factory.mktemp("z3-ref"), "zero3": tmp_path_factory.mktemp("z3-dp2")}
    _train(out["ref"], data_dir, "optim.zero=1")
    _train(out["zero3"], data_dir, "--nproc", "2", "optim.zero=3")
    return out


def test_zero3_trains_like_one_process(runs):
    assert_same_losses(runs["zero3"], runs["ref"], "zero 3 at dp=2")
    assert records(runs["zero3"], "param_bytes")[0] < records(runs["ref"], "param_bytes")[0] / 2 + 4096


@pytest.mark.parametrize(
    "layout",
    [["--nproc", "4", "--pp", "2", "parallel.pp_schedule=zb-h1"],
     ["--nproc", "4", "--tp", "2", "parallel.sequence_parallel=true", "optim.zero3_reshard_after_forward=false",
      "train.recompute=full"]],
    ids=["pp2-dp2-zbh1", "tp2-dp2-sp-keep-gathered-recompute"],
)
def test_zero3_composes_with_tp_pp_and_recompute(runs, data_dir, tmp_path, layout):
    _train(tmp_path, data_dir, *layout, "optim.zero=3")
    assert_same_losses(tmp_path, runs["ref"], " ".join(layout))


@pytest.mark.parametrize(
    "first, then",
    [(["--nproc", "2", "optim.zero=3"], ["--nproc", "2", "--tp", "2", "optim.zero=1"]),
     (["optim.zero=1"], ["--nproc", "2", "optim.zero=3"])],
    ids=["zero3-dp2-to-zero1-tp2", "zero1-to-zero3-dp2"],
)
def test_checkpoints_move_between_zero3_and_other_stages(runs, data_dir, tmp_path, first, then):
    _train(tmp_path, data_dir, *first, "train.exit_interval=4")
    assert "resumed from" in _train(tmp_path, data_dir, *then)
    assert_same_losses(tmp_path, runs["ref"], f"{' '.join(first)} to step 4, then {' '.join(then)}")


def test_zero3_resume_at_the_same_layout_is_bitwise(runs, data_dir, tmp_path):
    _train(tmp_path, data_dir, "--nproc", "2", "optim.zero=3", "train.exit_interval=4")
    _train(tmp_path, data_dir, "--nproc", "2", "optim.zero=3")
    assert records(tmp_path, "loss") == records(runs["zero3"], "loss")
    assert records(tmp_path, "val_loss") == records(runs["zero3"], "val_loss")


def test_export_and_generate_from_a_zero3_checkpoint(runs, tmp_path):
    from safetensors.torch import load_file

    for name in ("ref", "zero3"):
        trident("export", "--checkpoint", str(runs[name]), "--output", str(tmp_path / name))
    ref, got = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("ref", "zero3"))
    assert ref.keys() == got.keys()
    for key, t in ref.items():
        assert (got[key] - t).norm() <= 1e-5 * max(t.norm(), 1e-4), key
    texts = [trident("generate", "--checkpoint", str(runs[n]), "--prompt", "def main(", "--greedy",
                     "--max-new-tokens", "8", "--no-stop").stdout for n in ("ref", "zero3")]
    assert texts[0] == texts[1] and texts[0].startswith("def main(")
