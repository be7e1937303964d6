"""Shared fixtures: one pool of long-lived rank processes for the whole test session."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from harness import WorkerPool  # noqa: E402


@pytest.fixture(scope="session")
def dist_pool():
    """`dist_pool.run(world, "module:function", timeout=..., **kwargs)` -> per-rank results."""
    pool = WorkerPool()
    yield pool
    pool.close()
