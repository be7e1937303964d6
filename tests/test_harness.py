"""The harness itself: results come back, a raising rank and a hung rank fail loudly."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from harness import DistributedTestError


def _sum_ranks() -> list[float]:
    x = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(x)
    return [dist.get_rank(), x.item()]


def _rank1_raises() -> None:
    if dist.get_rank() == 1:
        raise RuntimeError("deliberate failure on rank 1")
    dist.barrier()  # rank 0 waits here for a rank that never comes


def _rank0_hangs() -> None:
    if dist.get_rank() == 0:
        import time

        time.sleep(60)
    return None


def test_results_come_back_in_rank_order(dist_pool):
    assert dist_pool.run(3, "test_harness:_sum_ranks") == [[0, 6.0], [1, 6.0], [2, 6.0]]


def test_a_raising_rank_fails_with_every_rank_reported(dist_pool):
    with pytest.raises(DistributedTestError) as info:
        dist_pool.run(2, "test_harness:_rank1_raises", timeout=60)
    text = str(info.value)
    assert "deliberate failure on rank 1" in text
    assert "=== rank 1: raised" in text
    # rank 0 either saw its peer vanish or hung in the barrier; either way it is reported
    assert "=== rank 0: raised" in text or "=== rank 0: did not finish (hung)" in text


def test_a_hang_times_out_with_the_stuck_stack(dist_pool):
    # start the workers first: on a loaded machine importing torch alone can take 4 s
    assert dist_pool.run(2, "test_harness:_sum_ranks")[1] == [1, 3.0]
    with pytest.raises(DistributedTestError) as info:
        dist_pool.run(2, "test_harness:_rank0_hangs", timeout=4)
    text = str(info.value)
    assert "timed out after 4 s" in text
    assert "=== rank 0: did not finish (hung)" in text and "in _rank0_hangs" in text  # its stack
    assert "=== rank 1: ok" in text
    # the pool recovers: the next task runs on fresh workers
    assert dist_pool.run(2, "test_harness:_sum_ranks")[1] == [1, 3.0]
