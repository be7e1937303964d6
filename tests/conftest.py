"""Shared fixtures: one pool of long-lived rank processes for the whole test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from cli_helpers import CONFIG, TINY, trident  # noqa: E402
from harness import WorkerPool  # noqa: E402


@pytest.fixture(scope="session")
def dist_pool():
    """`dist_pool.run(world, "module:function", timeout=..., **kwargs)` -> per-rank results."""
    pool = WorkerPool()
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The stdlib corpus, tokenizer and dataset, prepared once by a one-step run."""
    work = tmp_path_factory.mktemp("trident-data")
    trident("train", "--config", str(CONFIG), "--run-dir", str(work / "prep"), *TINY, "train.steps=1",
            f"data.work_dir={work}")
    return work
