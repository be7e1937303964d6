"""A save that dies at any point leaves `latest` on a complete, verified checkpoint.

The crash is injected in-process at every file-system step of `save_checkpoint` in turn
(each tensor file, each manifest, meta.json, each rename, the `latest` file), after a
first checkpoint exists; the previous checkpoint must still be the one found, verify,
and load; and the next successful save must clean up what the crash left.
"""

from __future__ import annotations

import json

import pytest
import torch

from trident.checkpoint import checkpoint as ckpt
from trident.checkpoint import durable
from trident.model.config import PRESETS
from trident.model.stage import build_stage
from trident.parallel.topology import Topology
from trident.parallel.zero.optimizer import DistributedOptimizer, OptimizerConfig


class Crash(RuntimeError):
    pass


def _parts():
    topo = Topology.single("cpu")
    model = build_stage(PRESETS["tiny"], topo)
    model.init_weights(0)
    return topo, model, DistributedOptimizer(model, topo, OptimizerConfig(zero=1))


def _count_steps(monkeypatch, root, topo, model, opt) -> int:
    """How many file-system steps one save takes (files written, renames)."""
    calls = []
    for name in ("save_file", "write_json"):
        real = getattr(durable, name)
        monkeypatch.setattr(durable, name, lambda *a, _real=real, **k: (calls.append(1), _real(*a, **k))[1])
    real_replace = ckpt.os.replace
    monkeypatch.setattr(ckpt.os, "replace", lambda *a, **k: (calls.append(1), real_replace(*a, **k))[1])
    ckpt.save_checkpoint(root, 99, topo, model, opt, None, ckpt.RunState(consumed_samples=0))
    monkeypatch.undo()
    return len(calls)


def test_a_crash_at_any_point_of_a_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    topo, model, opt = _parts()
    n_steps = _count_steps(monkeypatch, tmp_path / "probe", topo, model, opt)
    assert n_steps >= 7  # model, optimizer and rng files, a manifest, index, meta.json, rename, latest
    for crash_at in range(n_steps):
        root = tmp_path / f"crash{crash_at}"
        ckpt.save_checkpoint(root, 1, topo, model, opt, None, ckpt.RunState(consumed_samples=8))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # step 2's weights differ from step 1's
        calls = [0]

        def maybe_crash(real):
            def wrapped(*args, **kwargs):
                calls[0] += 1
                if calls[0] == crash_at + 1:
                    raise Crash(f"injected at file-system step {crash_at}")
                return real(*args, **kwargs)
            return wrapped

        for name in ("save_file", "write_json"):
            monkeypatch.setattr(durable, name, maybe_crash(getattr(durable, name)))
        monkeypatch.setattr(ckpt.os, "replace", maybe_crash(ckpt.os.replace))
        with pytest.raises(Crash):
            ckpt.save_checkpoint(root, 2, topo, model, opt, None, ckpt.RunState(consumed_samples=16))
        monkeypatch.undo()

        found = ckpt.latest_valid(root, log=False)
        latest = json.loads((root / ckpt.LATEST).read_text())
        if latest["step"] == 2:  # the crash came after `latest` was replaced: step 2 is complete
            assert found is not None and found.name == "step_0000002", crash_at
        else:
            assert latest["step"] == 1 and found is not None and found.name == "step_0000001", crash_at
            assert ckpt.read_state(found).consumed_samples == 8
        # the newest usable checkpoint loads, and a later save clears what the crash left
        ckpt.save_checkpoint(root, 3, topo, model, opt, None, ckpt.RunState(consumed_samples=24), keep=1)
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000003"], crash_at
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(1.0)


def _save_twice_rank1_dies_in_the_second(root: str) -> None:
    """Step 1 saved by both ranks; in step 2's save rank 1 dies after writing its tensors."""
    from trident.parallel.topology import Topology as T

    topo = T.from_initialized(tp=1, pp=1, dp=2)
    model = build_stage(PRESETS["tiny"], topo)
    model.init_weights(0)
    opt = DistributedOptimizer(model, topo, OptimizerConfig(zero=1))
    ckpt.save_checkpoint(root, 1, topo, model, opt, None, ckpt.RunState(consumed_samples=8))
    if topo.rank == 1:
        def die(path, obj, indent=2):
            raise Crash("rank 1 dies between writing its files and reporting them")
        durable.write_json = die
    ckpt.save_checkpoint(root, 2, topo, model, opt, None, ckpt.RunState(consumed_samples=16))


def test_a_save_interrupted_between_ranks_leaves_latest_on_the_previous_checkpoint(dist_pool, tmp_path):
    from harness import DistributedTestError

    root = tmp_path / "checkpoints"
    with pytest.raises(DistributedTestError, match="rank 1 dies between writing"):
        dist_pool.run(2, "test_checkpoint_atomicity:_save_twice_rank1_dies_in_the_second", timeout=60, root=str(root))
    assert json.loads((root / ckpt.LATEST).read_text())["step"] == 1
    assert not (root / "step_0000002").exists() and (root / "step_0000002.tmp").is_dir()
    found = ckpt.latest_valid(root, log=False)
    assert found is not None and found.name == "step_0000001"  # complete and verified
    assert set(ckpt.read_state(found).files) == {
        "model_pp0_tp0.safetensors", "optim_rank0.safetensors", "optim_rank1.safetensors",
        "rng_rank0.safetensors", "rng_rank1.safetensors", "index.json"}


def _full_disk(rank_to_fail: int):
    """safetensors' save_file (the lowest write layer Python reaches) failing for the
    optimizer file on `rank_to_fail` with the error safetensors gives for a full disk."""
    import torch.distributed as dist
    from safetensors import SafetensorError

    real = durable.save_file

    def save_file(tensors, path, metadata=None):
        me = dist.get_rank() if dist.is_initialized() else 0
        if me == rank_to_fail and "optim_rank" in str(path):
            raise SafetensorError(f"Error while serializing: I/O error: No space left on device (os error 28) "
                                  f"at path \"{path}.tmpXyZ\"")
        return real(tensors, path, metadata=metadata)

    return save_file


def test_a_full_disk_gives_one_sentence_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    from trident.errors import UserError

    topo, model, opt = _parts()
    root = tmp_path / "checkpoints"
    ckpt.save_checkpoint(root, 1, topo, model, opt, None, ckpt.RunState(consumed_samples=8))
    monkeypatch.setattr(durable, "save_file", _full_disk(0))
    words = (r"saving checkpoint step 2 to \S+step_0000002.tmp failed on rank 0: No space left on device writing "
             r"optim_rank0.safetensors; the checkpoint needs [0-9]+ bytes \([0-9.]+ [kMG]B\) and [0-9]+ bytes "
             r"\([0-9.]+ [kMG]B\) are free there; \S+step_0000002.tmp was removed and the previous checkpoint "
             r"stays the latest$")
    with pytest.raises(UserError, match=words):
        ckpt.save_checkpoint(root, 2, topo, model, opt, None, ckpt.RunState(consumed_samples=16))
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000001"]
    assert json.loads((root / ckpt.LATEST).read_text())["step"] == 1


def _save_with_a_full_disk_on_rank1(root: str) -> list[str]:
    from trident.errors import UserError
    from trident.parallel.topology import Topology as T

    topo = T.from_initialized(tp=1, pp=1, dp=2)
    model = build_stage(PRESETS["tiny"], topo)
    model.init_weights(0)
    opt = DistributedOptimizer(model, topo, OptimizerConfig(zero=1))
    ckpt.save_checkpoint(root, 1, topo, model, opt, None, ckpt.RunState(consumed_samples=8))
    real = durable.save_file
    durable.save_file = _full_disk(1)
    try:
        ckpt.save_checkpoint(root, 2, topo, model, opt, None, ckpt.RunState(consumed_samples=16))
    except UserError as err:
        return [str(err)]
    finally:
        durable.save_file = real
    return []


def test_a_full_disk_on_one_rank_stops_every_rank_without_a_hang(dist_pool, tmp_path):
    root = tmp_path / "checkpoints"
    rank0, rank1 = dist_pool.run(2, "test_checkpoint_atomicity:_save_with_a_full_disk_on_rank1", timeout=60,
                                 root=str(root))
    assert len(rank1) == 1 and "failed on rank 1: No space left on device writing optim_rank1" in rank1[0]
    assert len(rank0) == 1 and "failed on another rank" in rank0[0] and "the checkpoint needs" in rank0[0]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000001"]
