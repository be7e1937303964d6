"""The optimizer's state survives a save at one (tp, pp, dp, zero, dtype) and a load at
another, value for value, by global tensor name.

On 4 gloo ranks, each case builds the model at the saving layout (weights of seed 0),
sets exp_avg = 3 * master and exp_avg_sq = master**2 element by element (so every
stored value is tied to its position), saves every rank's state with safetensors the way
a checkpoint does (at zero 0 only dp rank 0 writes), and loads all the files into a
model of seed 1 at the loading layout. Then, exactly:

* the loaded parameters are the seed-0 weights of the loading layout (initialisation
  is layout-independent), so master landed where it belongs;
* on every rank exp_avg == 3 * master and exp_avg_sq == master**2, so the moments
  landed in the same places as master;
* the state saved again at the loading layout, reassembled into full tensors by global
  name with a per-element reference of the format written here, equals the original's.
"""

from __future__ import annotations

import json
import math
import os

BUCKET_MB = 0.002  # ~500 elements: dp shards cut parameters mid-row

CASES = [
    # (tp, pp, zero, dtype) saved -> (tp, pp, zero) loaded; dp = 4 / (tp * pp)
    ((2, 1, 1, "fp32"), (2, 1, 1)),  # the same layout
    ((2, 1, 1, "fp32"), (1, 2, 0)),
    ((1, 1, 2, "fp32"), (4, 1, 1)),  # tp=4 replicates the 2 kv heads
    ((4, 1, 0, "fp32"), (1, 1, 2)),
    ((1, 2, 0, "bf16"), (2, 2, 2)),
    ((2, 2, 1, "bf16"), (1, 1, 1)),
]


def config():
    from trident.model.config import preset

    # tied embeddings (a copy on the last stage at pp=2), padded vocabulary rows, QK-norm
    return preset("tiny", tie_embeddings=True, qk_norm=True, vocab_pad_multiple=8, n_kv_heads=2)


def _build(cfg, tp: int, pp: int, zero: int, dtype: str, seed: int):
    from trident.parallel.topology import Topology
    from trident.parallel.zero.mixed_precision import MixedPrecisionConfig, parse_dtype
    from trident.parallel.zero.optimizer import DistributedOptimizer, OptimizerConfig
    from trident.model.stage import build_stage

    topo = Topology.from_initialized(tp=tp, pp=pp)
    model = build_stage(cfg, topo, dtype=parse_dtype(dtype))
    model.init_weights(seed)
    opt = DistributedOptimizer(model, topo, OptimizerConfig(zero=zero, bucket_mb=BUCKET_MB), MixedPrecisionConfig(dtype))
    return topo, model, opt


def _save(opt, topo, folder: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    state = opt.state_dict()
    if opt.cfg.zero > 0 or topo.dp_rank == 0:
        save_file(state["tensors"], os.path.join(folder, f"optim_rank{topo.rank}.safetensors"),
                  metadata={"meta": json.dumps(state["meta"])})
    dist.barrier()


def _read(folder: str) -> list[dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    states = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        with safe_open(path, "pt") as f:
            meta = json.loads(f.metadata()["meta"])
        states.append({"tensors": load_file(path), "meta": meta})
    return states


def reference_indices(entry: dict):
    """Flat indices into the global tensor of an entry's stored values, element by element:
    the local parameter's flat range [a, z), those of its elements inside the piece (along
    the piece's dim), shifted to the piece's place in the global tensor."""
    import torch

    p, shape = entry["piece"], tuple(entry["local_shape"])
    a, z = entry["local_range"]
    coords = list(torch.unravel_index(torch.arange(a, z), shape))
    along = coords[p["dim"]] - p["local_start"]
    inside = (along >= 0) & (along < p["length"])
    coords = [c[inside] for c in coords]
    coords[p["dim"]] = along[inside] + p["start"]
    flat = torch.zeros_like(coords[0])
    for c, size in zip(coords, entry["global_shape"]):
        flat = flat * size + c
    return flat


def by_global_name(states: list[dict]) -> dict:
    """{kind/global name: full flat fp32 tensor}, and whether every element was stored."""
    import torch

    from trident.parallel.zero.state_layout import KINDS

    full, seen = {}, {}
    for st in states:
        for e in st["meta"]["entries"]:
            g, idx = e["global_name"], reference_indices(e)
            assert idx.numel() == e["count"], e["key"]
            if g not in seen:
                seen[g] = torch.zeros(math.prod(e["global_shape"]), dtype=torch.bool)
                for k in KINDS:
                    full[f"{k}/{g}"] = torch.zeros(math.prod(e["global_shape"]))
            for k in KINDS:
                full[f"{k}/{g}"][idx] = st["tensors"][f"{k}/{e['key']}"]
            seen[g][idx] = True
    return full, all(bool(s.all()) for s in seen.values())


def _round_trips(state_dir: str) -> list[dict]:
    import torch
    import torch.distributed as dist

    cfg = config()
    out = []
    for n, ((tp, pp, zero, dtype), (tp2, pp2, zero2)) in enumerate(CASES):
        where = f"tp={tp} pp={pp} zero={zero} {dtype} -> tp={tp2} pp={pp2} zero={zero2}"
        topo, _, opt = _build(cfg, tp, pp, zero, dtype, seed=0)
        with torch.no_grad():
            for master, m, v in zip(opt.master, opt.exp_avg, opt.exp_avg_sq):
                m.copy_(master * 3)
                v.copy_(master * master)
        opt.step_count = 7
        saved = os.path.join(state_dir, f"case{n}-saved")
        _save(opt, topo, saved)

        topo2, model2, opt2 = _build(cfg, tp2, pp2, zero2, dtype, seed=1)
        opt2.load_state_dict(_read(saved))
        _, expected, _ = _build(cfg, tp2, pp2, zero2, dtype, seed=0)
        params_equal = all(torch.equal(p, q) for p, q in zip(model2.parameters(), expected.parameters()))
        moments_tied = all(
            torch.equal(m, master * 3) and torch.equal(v, master * master)
            for master, m, v in zip(opt2.master, opt2.exp_avg, opt2.exp_avg_sq)
        )
        again = os.path.join(state_dir, f"case{n}-again")
        _save(opt2, topo2, again)
        record = {"where": where, "params_equal": params_equal, "moments_tied": moments_tied,
                  "step": opt2.step_count}
        if dist.get_rank() == 0:
            before, complete_before = by_global_name(_read(saved))
            after, complete_after = by_global_name(_read(again))
            record.update(
                complete=complete_before and complete_after,
                same_names=sorted(before) == sorted(after),
                differing=[k for k in before if k in after and not torch.equal(before[k], after[k])],
            )
        out.append(record)
        dist.barrier()
    return out


def test_state_round_trips_across_layouts_zero_stages_and_dtypes(dist_pool, tmp_path):
    results = dist_pool.run(4, "test_optimizer_state:_round_trips", timeout=400, state_dir=str(tmp_path))
    for rank, records in enumerate(results):
        for r in records:
            assert r["params_equal"], f"rank {rank}, {r['where']}: loaded parameters are not the saved ones"
            assert r["moments_tied"], f"rank {rank}, {r['where']}: exp_avg/exp_avg_sq not where master is"
            assert r["step"] == 7, r
            if rank == 0:
                assert r["complete"], f"{r['where']}: some global elements were not stored"
                assert r["same_names"], r["where"]
                assert not r["differing"], f"{r['where']}: state by global name differs: {r['differing'][:5]}"


def test_piece_ranges_match_the_element_reference():
    """For many shapes, pieces and owned ranges, the runs of views hold exactly the values
    the per-element reference names, on both the local and the global side."""
    import torch

    from trident.parallel.zero.state_layout import entry_runs, piece_range
    from trident.parallel.tensor.sharding import Piece

    gen = torch.Generator().manual_seed(0)
    checked = 0
    for shape, dim, local_size, global_size in [((7,), 0, 7, 7), ((6, 5), 0, 6, 15), ((6, 5), 1, 5, 12),
                                                 ((3, 4, 5), 1, 4, 9), ((3, 4, 5), 2, 5, 11), ((2, 3, 4, 2), 1, 3, 3)]:
        gshape = list(shape)
        gshape[dim] = global_size
        full = torch.randn(gshape, generator=gen)
        numel = math.prod(shape)
        for length in range(1, local_size + 1):
            for local_start in range(local_size - length + 1):
                start = (local_start * 3) % (global_size - length + 1)
                piece = Piece("w", tuple(gshape), dim, start, length, local_start)
                local = torch.zeros(shape)
                local.narrow(dim, local_start, length).copy_(full.narrow(dim, start, length))
                for a in range(0, numel, max(1, numel // 7)):
                    for z in (a + 1, a + numel // 3 + 1, numel):
                        z = min(z, numel)
                        entry = {"key": "w", "global_name": "w", "global_shape": gshape, "local_shape": list(shape),
                                 "local_range": [a, z], "piece": {"dim": dim, "start": start, "length": length,
                                                                  "local_start": local_start, "replicas": 1}}
                        idx = reference_indices(entry)
                        p0, p1 = piece_range(shape, piece, a, z)
                        assert p1 - p0 == idx.numel()
                        if idx.numel() == 0:
                            continue
                        expect = full.reshape(-1)[idx]
                        own = local.reshape(-1)[a:z].clone()
                        got_local = torch.cat([r.reshape(-1) for r in entry_runs(entry, own, local=True)])
                        got_global = torch.cat([r.reshape(-1) for r in entry_runs(entry, full.reshape(-1))])
                        assert torch.equal(got_local, expect), (shape, dim, piece, a, z)
                        assert torch.equal(got_global, expect), (shape, dim, piece, a, z)
                        checked += 1
    assert checked > 500


class _RecordingFile:
    """A `safe_open` file that logs (file, tensor, bytes) of every value read through it."""

    def __init__(self, f, name: str, log: list) -> None:
        self.f, self.name, self.log = f, name, log

    def __enter__(self):
        self.f.__enter__()
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

    def metadata(self):
        return self.f.metadata()

    def keys(self):
        return self.f.keys()

    def get_tensor(self, key: str):
        t = self.f.get_tensor(key)
        self.log.append((self.name, key, t.numel() * t.element_size()))
        return t

    def get_slice(self, key: str):
        view, log, name = self.f.get_slice(key), self.log, self.name

        class _Slice:
            def __getitem__(self, index):
                t = view[index]
                log.append((name, key, t.numel() * t.element_size()))
                return t

        return _Slice()


def _reads(state_dir: str) -> list[dict]:
    """Save at tp=1 dp=4 (zero 1) the way a checkpoint does, then `load_optimizer` at the same
    layout and at tp=2 dp=2, logging what each rank reads from the files."""
    import torch
    import torch.distributed as dist
    from safetensors import safe_open

    from trident.checkpoint import checkpoint as ckpt
    from trident.parallel.zero.state_layout import KINDS

    cfg = config()
    topo, _, opt = _build(cfg, 1, 1, 1, "fp32", seed=0)
    with torch.no_grad():
        for master, m, v in zip(opt.master, opt.exp_avg, opt.exp_avg_sq):
            m.copy_(master * 3)
            v.copy_(master * master)
    opt.step_count = 7
    saved = os.path.join(state_dir, "saved")
    _save(opt, topo, saved)
    stored = sum(e["count"] for st in _read(saved) for e in st["meta"]["entries"]) * len(KINDS) * 4

    out = []
    for tp2 in (1, 2):
        topo2, model2, opt2 = _build(cfg, tp2, 1, 1, "fp32", seed=1)
        log: list = []
        ckpt.safe_open = lambda path, **kw: _RecordingFile(safe_open(path, **kw), os.path.basename(path), log)
        try:
            ckpt.load_optimizer(saved, opt2)
        finally:
            ckpt.safe_open = safe_open
        _, expected, _ = _build(cfg, tp2, 1, 1, "fp32", seed=0)
        own = sum(e["count"] for e in opt2.state_dict()["meta"]["entries"]) * len(KINDS) * 4
        out.append({
            "tp": tp2,
            "read": sum(n for _, _, n in log),
            "files": sorted({f for f, _, _ in log}),
            "own": own,
            "stored": stored,
            "params_equal": all(torch.equal(p, q) for p, q in zip(model2.parameters(), expected.parameters())),
            "moments_tied": all(torch.equal(m, master * 3) and torch.equal(v, master * master)
                                for master, m, v in zip(opt2.master, opt2.exp_avg, opt2.exp_avg_sq)),
            "step": opt2.step_count,
        })
        dist.barrier()
    return out


def test_load_optimizer_reads_only_what_the_rank_owns(dist_pool, tmp_path):
    """`load_optimizer` reads the saved files lazily: at the same layout each rank reads its own
    file's entries and nothing else; resharded to tp=2 it reads well under half of the saved
    state (it owns a quarter), and the values still land exactly."""
    results = dist_pool.run(4, "test_optimizer_state:_reads", timeout=300, state_dir=str(tmp_path))
    for rank, records in enumerate(results):
        same, reshard = records
        for r in records:
            assert r["params_equal"] and r["moments_tied"] and r["step"] == 7, (rank, r)
        assert same["files"] == [f"optim_rank{rank}.safetensors"], (rank, same)
        assert same["read"] == same["own"], (rank, same)
        assert reshard["own"] <= reshard["read"] < reshard["stored"] / 2, (rank, reshard)
