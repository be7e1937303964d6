"""`trident train --cp`: context-parallel runs log the losses of one process (training and
validation), and checkpoints move between cp sizes (the format has no cp in it).

The tiny config of test_train_cli (seq_len 32, document masking on: the stdlib corpus
packs several documents per row), 6 steps, validation at step 5.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import CONFIG, TINY, assert_same_losses, trident

STEPS = ["train.steps=6", "optim.zero=1"]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cp-ref")
    trident("train", "--config", str(CONFIG), "--run-dir", str(run), *TINY, *STEPS, f"data.work_dir={data_dir}")
    return run


@pytest.mark.parametrize(
    "nproc, layout",
    [(4, ["--cp", "2", "--tp", "2", "parallel.sequence_parallel=true"]),
     (4, ["--cp", "2", "--pp", "2", "parallel.pp_schedule=zb-h1"])],
    ids=["tp2-cp2-sp", "cp2-pp2-zbh1"],
)
def test_cp_trains_like_one_process(reference, data_dir, tmp_path, nproc, layout):
    proc = trident("train", "--config", str(CONFIG), "--nproc", str(nproc), *layout, "--run-dir", str(tmp_path),
                   *TINY, *STEPS, f"data.work_dir={data_dir}")
    assert "cp=2" in proc.stdout  # the layout line of the start-of-run summary
    assert_same_losses(tmp_path, reference, " ".join(layout))


def test_checkpoint_moves_between_cp_sizes(reference, data_dir, tmp_path):
    """cp 2 (steps 1-2) -> cp 1 (3-4) -> cp 2 x dp 2 (5-6, validation at 5): one
    process's losses throughout, cp=2 alone included."""
    common = ["--config", str(CONFIG), "--run-dir", str(tmp_path), *TINY, *STEPS, f"data.work_dir={data_dir}",
              "checkpoint.interval=2", "train.exit_interval=2"]
    hops = [["--nproc", "2", "--cp", "2"], [], ["--nproc", "4", "--cp", "2"]]
    for hop, layout in enumerate(hops):
        proc = trident("train", *layout, *common, *(["--resume"] if hop else []))
        if hop:
            assert "resumed from" in proc.stdout and "resharded" in proc.stdout, proc.stdout
        else:
            assert "cp=2" in proc.stdout
    assert_same_losses(tmp_path, reference, "cp2 to step 2, cp1 to step 4, cp2 x dp2 to step 6")


@pytest.mark.parametrize(
    "args, words",
    [(["data.seq_len=30", "model.max_seq_len=30"], "sequence length 30 is not divisible by 2*cp = 4"),
     (["model.attention_dropout=0.1"], "model.attention_dropout=0.1 cannot be used with parallel.cp=2")],
)
def test_a_layout_cp_cannot_run_is_one_sentence(data_dir, tmp_path, args, words):
    proc = trident("train", "--config", str(CONFIG), "--nproc", "2", "--cp", "2", "--run-dir", str(tmp_path), *TINY,
                   *args, f"data.work_dir={data_dir}", check=False)
    assert proc.returncode != 0
    assert words in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
