"""Checkpoints at scale and under faults: a full disk, durability, parallel verification,
optimizer loads that open only the files they need.

* A real full disk (a small tmpfs mounted here; skipped only where mounting is refused,
  the injected-ENOSPC tests of test_checkpoint_atomicity cover that case): the save is
  refused before writing with one sentence (folder, bytes needed, bytes free), or, when
  the space vanishes during the save, ends on every rank with one sentence naming the
  file; the partial folder is gone, `latest` untouched, the space free again.
* Every file and folder is fsynced before the rename, the root after it and before
  `latest` changes; every rank creates the folder it writes into.
* Resume verification: each rank hashes only files it reads, each file once per replica
  group; a corrupt file falls back to the previous checkpoint on every rank with the
  sentence naming it.
* Optimizer load: at the same layout a rank opens its own file only; resharded, only the
  files the index says overlap; a checkpoint without the index still loads (every file).
"""

from __future__ import annotations

import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from trident.checkpoint import checkpoint as ckpt
from trident.checkpoint import durable
from trident.errors import UserError
from trident.model.config import PRESETS
from trident.model.stage import build_stage
from trident.parallel.topology import Topology
from trident.parallel.zero.optimizer import DistributedOptimizer, OptimizerConfig


def _parts():
    topo = Topology.single("cpu")
    model = build_stage(PRESETS["tiny"], topo)
    model.init_weights(0)
    return topo, model, DistributedOptimizer(model, topo, OptimizerConfig(zero=1))


def _tensor_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.endswith(".safetensors"))


@contextmanager
def _tmpfs(path: Path, nbytes: int):
    """A tmpfs of `nbytes` mounted at `path`: a real disk that fills up."""
    path.mkdir(parents=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={nbytes}", "tmpfs", str(path)],
                              capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here; the injected-ENOSPC tests cover a full disk")
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is refused here ({done.stderr.strip()}); the injected-ENOSPC tests cover it")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_real_full_disk_refuses_or_ends_the_save_cleanly(tmp_path, monkeypatch):
    topo, model, opt = _parts()
    probe = ckpt.save_checkpoint(tmp_path / "probe", 1, topo, model, opt, None, ckpt.RunState())
    one = sum(p.stat().st_size for p in probe.iterdir())
    with _tmpfs(tmp_path / "disk", one + one // 2) as disk:
        root = disk / "checkpoints"
        ckpt.save_checkpoint(root, 1, topo, model, opt, None, ckpt.RunState(consumed_samples=8))
        free = durable.free_bytes(root)
        # the check before writing: the checkpoint cannot fit, nothing is written
        with pytest.raises(UserError) as refused:
            ckpt.save_checkpoint(root, 2, topo, model, opt, None, ckpt.RunState(consumed_samples=16))
        words = str(refused.value)
        need = int(words.split("the checkpoint needs ")[1].split(" bytes")[0])
        assert words.startswith(f"cannot save checkpoint step 2 in {root}: the checkpoint needs ")
        assert f"and {free} bytes" in words and "nothing was written" in words, words
        assert _tensor_bytes(root / "step_0000001") <= need < _tensor_bytes(root / "step_0000001") + 4096
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000001"]
        # the space vanishes after the check (another job filled the disk): safetensors' real ENOSPC
        monkeypatch.setattr(durable, "tensor_file_bytes", lambda tensors, metadata: 0)
        with pytest.raises(UserError, match=rf"^saving checkpoint step 2 to {root}/step_0000002.tmp failed on rank 0: "
                                            r"No space left on device writing (model_pp0_tp0|optim_rank0)"
                                            r".safetensors; the checkpoint needs 0 bytes and \d+ bytes .* "
                                            r"was removed and the previous checkpoint stays the latest$"):
            ckpt.save_checkpoint(root, 2, topo, model, opt, None, ckpt.RunState(consumed_samples=16))
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000001"]
        assert durable.free_bytes(root) == free  # the partial files are gone
        assert ckpt.latest_valid(root, log=False) == root / "step_0000001"


def _save_on_a_full_tmpfs(root: str) -> dict:
    """2 ranks save step 1, then step 2 onto a disk too small for it (the free-space check
    fooled): every rank must end with one sentence, none may hang."""
    from trident.parallel.topology import Topology as T

    topo = T.from_initialized(tp=1, pp=1, dp=2)
    model = build_stage(PRESETS["tiny"], topo)
    model.init_weights(0)
    opt = DistributedOptimizer(model, topo, OptimizerConfig(zero=1))
    made = []
    real_mkdir = Path.mkdir
    Path.mkdir = lambda self, *a, **k: (made.append(self.name), real_mkdir(self, *a, **k))[1]
    try:
        ckpt.save_checkpoint(root, 1, topo, model, opt, None, ckpt.RunState(consumed_samples=8))
    finally:
        Path.mkdir = real_mkdir
    real_bytes = durable.tensor_file_bytes
    durable.tensor_file_bytes = lambda tensors, metadata: 0
    try:
        ckpt.save_checkpoint(root, 2, topo, model, opt, None, ckpt.RunState(consumed_samples=16))
    except UserError as err:
        return {"error": str(err), "made": made}
    finally:
        durable.tensor_file_bytes = real_bytes
    return {"error": None, "made": made}


def test_a_real_full_disk_ends_the_save_on_every_rank(dist_pool, tmp_path):
    topo, model, opt = _parts()
    one = sum(p.stat().st_size for p in ckpt.save_checkpoint(tmp_path / "probe", 1, topo, model, opt, None,
                                                               ckpt.RunState()).iterdir())
    with _tmpfs(tmp_path / "disk", int(1.6 * one)) as disk:  # step 1 (about one at dp 2) fits, step 2 does not
        root = disk / "checkpoints"
        results = dist_pool.run(2, "test_checkpoint_scale:_save_on_a_full_tmpfs", timeout=120, root=str(root))
        for rank, r in enumerate(results):
            assert "step_0000001.tmp" in r["made"], (rank, r)  # each rank made its own view of the folder
            err = r["error"]
            assert err is not None and err.startswith(f"saving checkpoint step 2 to {root}/step_0000002.tmp failed on "), err
            assert f"failed on rank {rank}: No space left on device writing " in err or "on another rank" in err, err
            assert err.endswith("was removed and the previous checkpoint stays the latest"), err
        assert any("No space left on device" in r["error"] for r in results)
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000001"]
        assert ckpt.latest_valid(root, log=False) == root / "step_0000001"


def test_files_and_folders_are_fsynced_before_the_rename_and_before_latest(tmp_path, monkeypatch):
    topo, model, opt = _parts()
    root = tmp_path / "checkpoints"
    ckpt.save_checkpoint(root, 1, topo, model, opt, None, ckpt.RunState())
    events: list[tuple[str, str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), "")),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b))[1])
    final = ckpt.save_checkpoint(root, 2, topo, model, opt, None, ckpt.RunState())
    tmp = str(root / "step_0000002.tmp")
    rename = events.index(("replace", tmp, str(final)))
    latest = events.index(("replace", str(root / "latest.tmp"), str(root / "latest")))
    synced_before = {path for kind, path, _ in events[:rename] if kind == "fsync"}
    for f in final.iterdir():  # JSON files are synced under their temporary name, then renamed
        assert {f"{tmp}/{f.name}", f"{tmp}/{f.name}.tmp"} & synced_before, f.name
    last_write = max(i for i, (kind, path, _) in enumerate(events[:rename]) if path.startswith(tmp + "/"))
    assert ("fsync", tmp, "") in events[last_write:rename]  # the folder, after its last file
    assert ("fsync", str(root), "") in events[rename:latest]  # the rename itself, before `latest` moves
    assert ("fsync", str(root / "latest.tmp"), "") in events[rename:latest]
    assert ("fsync", str(root), "") in events[latest:]


# --- parallel verification and optimizer loads (4 ranks) ------------------------------------
def _tie_moments(opt) -> None:
    """exp_avg = 3 * master and exp_avg_sq = master**2: every stored value tied to its place."""
    with torch.no_grad():
        for master, m, v in zip(opt.master, opt.exp_avg, opt.exp_avg_sq):
            m.copy_(master * 3)
            v.copy_(master * master)


def _spy(monkeypatch_like: dict) -> tuple[list[str], list[str]]:
    """Record the files hashed by resume and opened by the loaders (names only)."""
    from trident.checkpoint import resume

    hashed: list[str] = []
    opened: list[str] = []
    real_sha, real_open = resume.sha256_file, ckpt.safe_open
    monkeypatch_like.update(sha=real_sha, open=real_open)
    resume.sha256_file = lambda path: (hashed.append(Path(path).name), real_sha(path))[1]
    ckpt.safe_open = lambda path, **kw: (opened.append(Path(path).name), real_open(path, **kw))[1]
    return hashed, opened


def _unspy(saved: dict) -> None:
    from trident.checkpoint import resume

    resume.sha256_file, ckpt.safe_open = saved["sha"], saved["open"]


def _build(tp: int, seed: int, bucket_mb: float):
    """The model of test_optimizer_state (tied embeddings, padded vocabulary, QK-norm, 2 kv
    heads) at tp and dp = 4 / tp, zero 1, with `bucket_mb` buckets (each sharded over dp)."""
    from test_optimizer_state import config

    topo = Topology.from_initialized(tp=tp, pp=1)
    model = build_stage(config(), topo)
    model.init_weights(seed)
    return topo, model, DistributedOptimizer(model, topo, OptimizerConfig(zero=1, bucket_mb=bucket_mb))


def _save_verify_corrupt(root: str, bucket_mb: float) -> dict:
    """dp=4: save steps 1 and 2; choose (what each rank hashed); load at the same layout (what
    each rank opened); then corrupt optim_rank2 of step 2 and choose again."""
    import torch.distributed as dist

    from trident.checkpoint.resume import choose_checkpoint

    topo, model, opt = _build(1, 0, bucket_mb)
    _tie_moments(opt)
    for step in (1, 2):
        ckpt.save_checkpoint(root, step, topo, model, opt, None, ckpt.RunState())
    _, model2, opt2 = _build(1, 1, bucket_mb)
    saved: dict = {}
    hashed, opened = _spy(saved)
    logs: list[str] = []
    try:
        chosen = choose_checkpoint(root, topo, model2, opt2, log=logs.append)
        verified = sorted(hashed)
        ckpt.load_model(chosen, model2)
        ckpt.load_optimizer(chosen, opt2)
        loaded = sorted(set(opened))
        dist.barrier()
        if topo.rank == 2:
            with open(Path(chosen) / "optim_rank2.safetensors", "r+b") as f:
                f.seek(-8, os.SEEK_END)
                f.write(b"\xff" * 8)
        dist.barrier()
        hashed.clear()
        fallback = choose_checkpoint(root, topo, model2, opt2, log=logs.append)
    finally:
        _unspy(saved)
    return {"chosen": Path(chosen).name, "verified": verified, "opened": loaded, "fallback": Path(fallback).name,
            "hashed_again": sorted(hashed), "logs": logs,
            "exact": all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
            and all(torch.equal(a, b) for a, b in zip(opt.exp_avg, opt2.exp_avg))}


def test_each_rank_verifies_only_what_it_reads_and_a_corrupt_file_is_named(dist_pool, tmp_path):
    root = tmp_path / "checkpoints"
    results = dist_pool.run(4, "test_checkpoint_scale:_save_verify_corrupt", timeout=300, root=str(root),
                            bucket_mb=0.002)  # ~500-element buckets: dp shards cut parameters mid-row
    files = set(ckpt.read_state(root / "step_0000001").files) - {"index.json"}
    every_hash = [name for r in results for name in r["verified"]]
    assert sorted(every_hash) == sorted(files)  # each file hashed once over the job, none left out
    for rank, r in enumerate(results):
        assert r["chosen"] == "step_0000002" and r["exact"], (rank, r)
        own = {f"optim_rank{rank}.safetensors", f"rng_rank{rank}.safetensors"}
        assert own <= set(r["verified"]) <= own | {"model_pp0_tp0.safetensors"}, (rank, r["verified"])
        assert set(r["verified"]) <= set(r["opened"]) | {f"rng_rank{rank}.safetensors"}, r  # never what it does not read
        assert r["opened"] == ["model_pp0_tp0.safetensors", f"optim_rank{rank}.safetensors"], (rank, r["opened"])
        assert r["fallback"] == "step_0000001", r
        assert [line for line in r["logs"]] == [
            f"checkpoint step_0000002 is unusable: checkpoint file {str(root / 'step_0000002' / 'optim_rank2.safetensors')!r} "
            "fails its sha256 check " + r["logs"][0].split("fails its sha256 check ")[1]]
        assert r["logs"][0].endswith("(found by rank 2); falling back to an earlier one"), r["logs"]
        assert ("optim_rank2.safetensors" in r["hashed_again"]) == (rank == 2)


def _reshard_reads(root: str) -> dict:
    """Load the dp=4 checkpoint at tp=2 dp=2: what each rank hashes and opens; then the same
    load with the index removed (a checkpoint from before it existed)."""
    import torch.distributed as dist
    from safetensors import safe_open

    from trident.checkpoint.resume import choose_checkpoint
    from trident.parallel.zero.optimizer_state import local_entries
    from trident.parallel.zero.state_layout import global_indices

    topo, model2, opt2 = _build(2, 1, 25.0)
    _, expected, _ = _build(2, 0, 25.0)
    mine: dict[str, set] = {}  # the reference: the global elements this rank owns, by tensor
    for meta, _, _ in local_entries(opt2):
        mine.setdefault(meta["global_name"], set()).update(global_indices(meta).tolist())
    overlapping = []
    for path in sorted(Path(root, "step_0000001").glob("optim_rank*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            entries = json.loads(f.metadata()["meta"])["entries"]
        if any(mine.get(e["global_name"], set()) & set(global_indices(e).tolist()) for e in entries):
            overlapping.append(path.name)
    saved: dict = {}
    hashed, opened = _spy(saved)
    out: dict = {"overlapping": overlapping}
    try:
        chosen = choose_checkpoint(root, topo, model2, opt2, log=print)
        out["verified"] = sorted(hashed)
        for name in ("index", "fallback"):
            opened.clear()
            ckpt.load_model(chosen, model2)
            ckpt.load_optimizer(chosen, opt2)
            out[name] = {
                "optim_opened": sorted({n for n in opened if n.startswith("optim_")}),
                "opened": sorted(set(opened)),
                "exact": all(torch.equal(p, q) for p, q in zip(model2.parameters(), expected.parameters()))
                and all(torch.equal(m, w * 3) and torch.equal(v, w * w)
                        for w, m, v in zip(opt2.master, opt2.exp_avg, opt2.exp_avg_sq)),
            }
            dist.barrier()
            if name == "index" and topo.rank == 0:  # as saved before the index existed
                meta = json.loads((chosen / "meta.json").read_text())
                del meta["files"]["index.json"]
                (chosen / "meta.json").write_text(json.dumps(meta))
                (chosen / "index.json").unlink()
            dist.barrier()
            with torch.no_grad():
                for p in model2.parameters():
                    p.zero_()
    finally:
        _unspy(saved)
    return out


def test_a_resharded_load_opens_only_the_overlapping_optimizer_files(dist_pool, tmp_path):
    root = tmp_path / "checkpoints"
    dist_pool.run(4, "test_checkpoint_scale:_save_verify_corrupt", timeout=300, root=str(root), bucket_mb=25.0)
    (root / "step_0000002").rename(root / "corrupt")  # keep the intact step 1 only
    results = dist_pool.run(4, "test_checkpoint_scale:_reshard_reads", timeout=300, root=str(root))
    every_opened = set().union(*(r["index"]["opened"] for r in results))
    assert set().union(*(r["verified"] for r in results)) == every_opened  # all that is read is verified
    for rank, r in enumerate(results):
        assert set(r["verified"]) <= set(r["index"]["opened"]), (rank, r)  # and nothing else
        assert r["index"]["exact"] and r["fallback"]["exact"], (rank, r)
        # exactly the files holding elements it owns (brute force over element indices), not every file
        assert r["index"]["optim_opened"] == r["overlapping"], (rank, r)
        assert r["fallback"]["optim_opened"] == [f"optim_rank{i}.safetensors" for i in range(4)]
    assert sum(len(r["index"]["optim_opened"]) for r in results) < 4 * 4, results
