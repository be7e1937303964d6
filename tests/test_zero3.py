"""ZeRO-3 keeps the core promise: with parameters sharded over dp and gathered per unit,
AdamW steps (clipping active, two microbatches per step, tied embeddings, QK-norm) give the
parameters of single-process torch.optim.AdamW, at dp 2 and 4 and composed with tp, pp,
recomputation and both resharding policies; each rank persistently holds 1/dp of its
parameters; and the collectives are issued ahead of the compute that needs them.

The reference, batches and training step are test_zero_equivalence's.
"""

from __future__ import annotations

import pytest
from test_zero_equivalence import (
    NORM_TOL,
    STEPS,
    TOL,
    compare,
    config,
    full_params,
    global_batch,
    reference,
    train_step,
)

CASES = {
    2: [{"tp": 1, "pp": 1}, {"tp": 1, "pp": 1, "reshard": False}, {"tp": 1, "pp": 1, "recompute": "full"},
        {"tp": 1, "pp": 1, "overlap": False}],
    4: [{"tp": 1, "pp": 1}, {"tp": 2, "pp": 1, "sp": True}, {"tp": 1, "pp": 2},
        {"tp": 1, "pp": 2, "reshard": False, "recompute": "selective"},
        {"tp": 1, "pp": 2, "layers": 4, "schedule": "interleaved", "vpp": 2}],
    8: [{"tp": 2, "pp": 2, "sp": True}],
}


def build(cfg, topo, case: dict):
    from test_zero_equivalence import OPTIM

    from trident.model.stage import build_stage
    from trident.parallel.zero.mixed_precision import MixedPrecisionConfig
    from trident.parallel.zero.optimizer import DistributedOptimizer, OptimizerConfig

    model = build_stage(cfg, topo, sequence_parallel=case.get("sp", False), recompute=case.get("recompute", "none"),
                        vpp=case.get("vpp", 1))
    model.init_weights(0)
    ocfg = OptimizerConfig(**OPTIM, zero=3, zero3_reshard_after_forward=case.get("reshard", True),
                           overlap_grad_reduce=case.get("overlap", True))
    return model, DistributedOptimizer(model, topo, ocfg, MixedPrecisionConfig(dtype="fp32"))


def _check(size: int) -> list[dict]:
    import dataclasses

    from trident.model.gpt import GPT
    from trident.parallel.tensor.sharding import global_shapes
    from trident.parallel.topology import Topology

    refs: dict[int, tuple] = {}  # the one-process run for each depth
    out = []
    for case in CASES[size]:
        cfg = dataclasses.replace(config(), n_layers=case.get("layers", config().n_layers))
        if cfg.n_layers not in refs:
            refs[cfg.n_layers] = (reference(cfg), global_shapes(GPT(cfg, Topology.single())))
        ref, names = refs[cfg.n_layers]
        topo = Topology.from_initialized(tp=case["tp"], pp=case["pp"])
        model, opt = build(cfg, topo, case)
        schedule = {k: case[k] for k in ("schedule", "vpp") if k in case}
        norms = []
        for step in range(STEPS):
            r, _ = train_step(model, opt, topo, global_batch(cfg, step), sp=case.get("sp", False), **schedule)
            norms.append(r.grad_norm)
        # between steps a rank holds its shards only: every parameter is a placeholder
        placeholders = all(p.data.stride() == (0,) * p.dim() for p in model.parameters() if p.requires_grad)
        out.append({**case, "dp": topo.dp, "param_err": compare(full_params(model, topo, names, opt), ref["params"][-1]),
                    "norm_errs": [abs(a / b - 1) for a, b in zip(norms, ref["norms"])],
                    "memory": opt.memory(), "placeholders": placeholders,
                    "local": sum(p.numel() for p in model.parameters())})
    return out


def _assert(results: list[dict]) -> None:
    for r in results:
        where = f"zero 3 {r}"
        assert r["param_err"] <= TOL, f"{where}: parameters differ from AdamW by {r['param_err']:.2e}"
        assert max(r["norm_errs"]) <= NORM_TOL, f"{where}: gradient norms differ {r['norm_errs']}"
        assert r["placeholders"], f"{where}: full parameters survived the step"
        m = r["memory"]
        assert m["shard_numel"] * r["dp"] == m["padded_numel"] and m["numel"] == r["local"], where
        assert m["param_bytes"] == 4 * m["shard_numel"] and m["grad_bytes"] == 4 * m["shard_numel"], where
        if r["dp"] == 4:  # units whose size dp does not divide are padded, never refused
            assert m["padding"] > 0, where


@pytest.mark.parametrize("size", [2, 4, 8])
def test_zero3_matches_single_process(dist_pool, size):
    results = dist_pool.run(size, "test_zero3:_check", timeout=400, size=size)
    assert len(results[0]) == len(CASES[size])
    for r in results:
        _assert(r)


def _issue_order() -> dict:
    """One dp=2 step after a first one (the unit order is known by then): the events the
    sharded parameters recorded, as (what, unit) in the order they happened."""
    from trident.parallel.topology import Topology

    cfg = config()
    topo = Topology.from_initialized()
    model, opt = build(cfg, topo, {"tp": 1, "pp": 1})
    for step in range(2):
        train_step(model, opt, topo, global_batch(cfg, step))
    return {"order": opt.buffer.order, "events": [[what, unit] for _, what, unit in opt.buffer.events]}


def _pairs(events: list, start: str) -> list[tuple[int, int]]:
    """(index of `start` of a unit, index of `start` of the unit that ran next) for every
    consecutive pair of units in that phase."""
    starts = [i for i, e in enumerate(events) if e[0] == start]
    return list(zip(starts, starts[1:]))


def test_zero3_issues_each_collective_before_the_compute_that_waits_for_it(dist_pool):
    """Forward: the next unit's all-gather is issued before this unit computes. Backward:
    the next unit's all-gather is issued before this unit's backward ends, and this unit's
    reduce-scatter before the next unit's backward begins. (Tied embeddings: the embedding
    unit runs first and again as the head, and stays gathered through the backward.)"""
    got = dist_pool.run(2, "test_zero3:_issue_order", timeout=120)[0]
    events = got["events"]
    assert got["order"] == ["embedding", "layers.0", "layers.1", "final_norm"], got["order"]
    checked = 0
    for i, j in _pairs(events, "forward"):
        cur, nxt = events[i][1], events[j][1]
        end = events.index(["forward_end", cur], i)
        if nxt == "embedding" or any(e[0] == "backward" for e in events[end:j]):
            continue  # the first unit of a microbatch: nothing ran before it to overlap with
        before = max([k for k in range(i) if events[k][0] == "forward_end"], default=0)
        assert ["all_gather_issue", nxt] in events[before:i], (cur, nxt, events[before:j])
        checked += 1
    for i, j in _pairs(events, "backward"):
        cur, nxt = events[i][1], events[j][1]
        if nxt == "embedding":  # the tied embedding is still gathered from its use as the head
            continue
        end = events.index(["backward_end", cur], i) if cur != "embedding" else j
        # issued as cur's backward begins: after the unit before it began, before cur ends
        before = max([k for k in range(i) if events[k][0] == "backward"], default=0)
        assert ["all_gather_issue", nxt] in events[before:end], (cur, nxt, events[before:j])
        if cur != "embedding":
            assert ["reduce_scatter_issue", cur] in events[i:j], (cur, nxt, events[i:j])
        checked += 1
    assert checked >= 10, checked


def _held_bytes(dtype: str) -> dict:
    """After a step, the bytes this rank actually holds (every storage its parameters,
    gradients and optimizer state point at, counted once), next to `trident plan`'s."""
    import torch
    import torch.distributed as dist

    from trident.model.stage import build_stage
    from trident.parallel.topology import Topology
    from trident.parallel.zero.mixed_precision import MixedPrecisionConfig, parse_dtype
    from trident.parallel.zero.optimizer import DistributedOptimizer, OptimizerConfig
    from trident.planning.plan import Settings
    from trident.planning.planner import make_plan

    cfg = config()
    topo = Topology.from_initialized() if dist.is_initialized() else Topology.single()
    model = build_stage(cfg, topo, dtype=parse_dtype(dtype))
    model.init_weights(0)
    opt = DistributedOptimizer(model, topo, OptimizerConfig(zero=3), MixedPrecisionConfig(dtype=dtype))
    data = global_batch(cfg, 0)
    rows = data["tokens"].shape[0] // topo.dp
    mine = {k: v[topo.dp_rank * rows : (topo.dp_rank + 1) * rows] for k, v in data.items()}
    opt.zero_grad()
    model(mine["tokens"], labels=mine["labels"]).float().mean().backward()
    opt.grad_sync()
    assert opt.step().stepped

    def storages(tensors) -> int:
        seen = {}
        for t in tensors:
            if t is not None:
                seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return sum(seen.values())

    units = opt.buffer.buckets
    params = storages([u.shard for u in units])
    placeholders = storages(list(model.parameters()))  # one NaN element per unit
    grads = storages([u.main_grad for u in units] + [p.grad for p in model.parameters()])
    optim = storages([opt._exp_avg_flat, opt._exp_avg_sq_flat, opt._master_flat])
    st = Settings(tp=1, pp=1, dp=topo.dp, zero=3, recompute="none", micro_batch_size=rows, seq_len=data["tokens"].shape[1],
                  global_batch_size=data["tokens"].shape[0], sequence_parallel=False, dtype=dtype)
    plan = make_plan(cfg, st, "cpu").stages[0]
    elem = torch.empty((), dtype=parse_dtype(dtype)).element_size()
    return {"held": [params, grads, optim], "planned": [plan.param_bytes, plan.grad_bytes, plan.optimizer_bytes],
            "placeholders": placeholders, "units": len(units), "elem": elem}


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_zero3_holds_what_the_planner_predicts(dist_pool, dp):
    for dtype in ("fp32", "bf16"):
        rows = [_held_bytes(dtype)] if dp == 1 else dist_pool.run(dp, "test_zero3:_held_bytes", timeout=120, dtype=dtype)
        for r in rows:
            assert r["held"] == r["planned"], (dp, dtype, r)
            assert r["placeholders"] <= r["units"] * r["elem"], r
        if dp > 1:
            one = _held_bytes(dtype)["held"][0]
            assert rows[0]["held"][0] * dp >= one and rows[0]["held"][0] * dp <= one + 16 * dp * 4 * rows[0]["units"]


def test_bench_zero_prints_zero3_rows():
    """`trident bench zero` with ZeRO-3: the shards halve at dp=2, the gathered units show in
    'param peak', and the hidden share of communication is a percentage (not asserted)."""
    from cli_helpers import trident

    out = trident("bench", "zero", "--dp", "1", "2", "--zero", "1", "3", "--layers", "1", "--hidden", "64", "--vocab",
                  "256", "--seq", "16", "--steps", "1", "--warmup", "0").stdout
    rows = {(int(c[0]), int(c[1])): c for c in (line.split() for line in out.splitlines()) if c and c[0] in ("1", "2")}
    assert set(rows) == {(1, 1), (1, 3), (2, 1), (2, 3)}, out
    assert abs(float(rows[(2, 3)][2]) * 2 - float(rows[(1, 3)][2])) <= 0.01, out  # params MiB: half at dp=2
    assert float(rows[(2, 3)][3]) > float(rows[(2, 3)][2]), out  # the gathered units on top
    assert rows[(2, 3)][-1].endswith("%") and rows[(2, 1)][-1] == "-", out


def test_a_freed_unit_holds_no_memory_where_autograd_saved_its_weights():
    """After a unit's forward its gathered parameters are freed even though autograd saved
    views of them for backward (a linear's transposed weight): the shared storage shrinks to
    0 bytes and is gathered back in place for the backward, whose gradients stay those of
    ZeRO-1 (the version counter of the refilled buffer is left alone)."""
    import torch

    from trident.model.stage import build_stage
    from trident.parallel.topology import Topology
    from trident.parallel.zero.optimizer import DistributedOptimizer, OptimizerConfig

    cfg, data = config(), global_batch(config(), 0)
    grads = {}
    for zero in (1, 3):
        model = build_stage(cfg, Topology.single())
        model.init_weights(0)
        opt = DistributedOptimizer(model, Topology.single(), OptimizerConfig(zero=zero))
        opt.zero_grad()
        weights = []  # saved tensors that are views of a gathered unit, as they were saved

        def pack(t: torch.Tensor) -> torch.Tensor:
            if zero == 3 and opt.buffer.holds(t):
                weights.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(data["tokens"], labels=data["labels"]).mean()
        if zero == 3:
            assert len(weights) >= 2 * cfg.n_layers  # the blocks' linears saved their weights
            # saved parameters now show their one-element NaN placeholder; saved views of the
            # gathered buffer (weight.t()) share its storage, shrunk to 0 bytes
            held = [t.untyped_storage().nbytes() for t in weights]
            assert all(n <= 4 for n in held) and held.count(0) >= cfg.n_layers, held
        loss.backward()
        opt.grad_sync()
        grads[zero] = torch.cat([b.main_grad for b in opt.buffer.buckets if b.main_grad is not None]).norm()
    assert torch.allclose(grads[3], grads[1], rtol=1e-5, atol=0), (grads[3].item(), grads[1].item())


def _switch_events(schedule: str, vpp: int, layers: int) -> dict:
    """Two steps at pp 2 x dp 2 under `schedule`; from the second (each action's units known
    by then): the gathers issued and waited for at once, and at every W's start the units
    gathered or on their way and the gradient buffers held."""
    import dataclasses

    from trident.parallel.topology import Topology

    cfg = dataclasses.replace(config(), n_layers=layers)
    topo = Topology.from_initialized(tp=1, pp=2)
    model, opt = build(cfg, topo, {"vpp": vpp})
    sp, at_w = opt.buffer, []
    begin = sp.begin_action

    def watch(action, following):
        begin(action, following)
        if action[0] == "W":
            at_w.append({"gathered": [u.name for u in sp.buckets if u.gathered or u.gather_work is not None],
                         "grad_buffers": [u.name for u in sp.buckets if u.grad_data is not None],
                         "parked": sum(g.numel() for u in sp.buckets for g in u.parked.values()),
                         "largest": max(u.numel for u in sp.buckets)})

    sp.begin_action = watch
    for step in range(2):
        at_w.clear()
        train_step(model, opt, topo, global_batch(cfg, step), schedule=schedule, vpp=vpp)
    events = [[what, unit] for _, what, unit in sp.events]
    exposed = [a[1] for a, b in zip(events, events[1:]) if a[0] == "all_gather_issue" and b == ["all_gather_wait", a[1]]]
    first = next(e[1] for e in events if e[0] in ("forward", "backward"))
    return {"exposed": exposed, "first": first, "at_w": at_w, "uses": sum(e[0] in ("forward", "backward") for e in events)}


@pytest.mark.parametrize("schedule, vpp, layers", [("1f1b", 1, 2), ("interleaved", 2, 4), ("zb-h1", 1, 2)])
def test_zero3_prefetches_across_actions_and_frees_a_unit_when_its_b_ends(dist_pool, schedule, vpp, layers):
    """Told the plan by the executor, the units prefetch across a switch from forward to
    backward and back (or stay gathered when the next action starts with the same unit):
    after the step's first unit no gather is issued only when it is needed. Under ZB-H1 a
    unit is freed when its B ends and its B's few gradients wait in fp32 on their own: at
    each W no unit is gathered but the next action's first (kept, or prefetched), and no
    unit-sized gradient buffer is held."""
    for rank, got in enumerate(dist_pool.run(4, "test_zero3:_switch_events", timeout=200, schedule=schedule,
                                             vpp=vpp, layers=layers)):
        assert got["uses"] >= 8, got
        assert got["exposed"] == [got["first"]], (rank, got["exposed"])
        if schedule == "zb-h1":
            assert len(got["at_w"]) == 2, got  # a W per microbatch
            for w in got["at_w"]:
                assert len(w["gathered"]) <= 1, (rank, w)  # the next action's first unit, on its way
                assert w["grad_buffers"] == [] and w["parked"] < w["largest"] // 10, (rank, w)
            assert max(w["parked"] for w in got["at_w"]) > 0, got  # the norms' gradients from a B
