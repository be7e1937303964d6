"""Interleaved 1F1B and ZB-H1 compute the single-process step: losses and every gradient.

One task on 4 gloo ranks loops over the cases: interleaved at (pp, vpp) in {(2,2), (2,3),
(4,2)} and ZB-H1 at pp in {2, 4}, with tp=2 (sequence parallel or not) and dp=2 mixed in,
tied and untied embeddings, packed documents, selective and full recomputation, and
forward-only evaluation under the same placement. Each case also checks what the
executor promises around the step: the data-parallel hooks (no B is "last" when W
follows), the schedule's in-flight bound, and that every output sent downstream had its
storage released (freed stage outputs). The reference is the whole global batch in one
process, as in test_pipeline_equivalence.
"""

from __future__ import annotations

import dataclasses

TOL = 1e-5
SEQ = 16
MBS = 2
LAYOUTS = [(1, 2), (2, 2), (1, 4)]  # (tp, pp); dp = 4 / (tp * pp)
#        schedule      tp pp vpp m  tied   sp     packed recompute    evaluate
CASES = [
    ("interleaved", 1, 2, 2, 2, False, False, False, "none", False),
    ("interleaved", 1, 2, 3, 4, True, False, False, "selective", True),
    ("interleaved", 2, 2, 2, 4, True, True, True, "none", False),
    ("interleaved", 1, 4, 2, 4, False, False, False, "full", True),
    ("interleaved", 1, 4, 2, 8, True, False, True, "none", False),
    ("zb-h1", 1, 2, 1, 1, True, False, False, "none", False),
    ("zb-h1", 1, 2, 1, 5, False, False, True, "full", False),
    ("zb-h1", 2, 2, 1, 2, False, True, False, "selective", False),
    ("zb-h1", 2, 2, 1, 3, True, False, False, "none", True),
    ("zb-h1", 1, 4, 1, 4, False, False, False, "none", True),
    ("zb-h1", 1, 4, 1, 9, True, False, True, "selective", False),
]
KEYS = ("schedule", "tp", "pp", "vpp", "m", "tied", "sp", "packed", "recompute", "evaluate")


def _config(tied: bool):
    from equivalence import VARIANTS

    name = "mha-learned-layernorm-gelu-tied" if tied else "gqa-rope-rmsnorm-swiglu-untied"
    return dataclasses.replace(VARIANTS[name], n_layers=8)  # 8 layers over 6 virtual stages is uneven


def _expected_hooks(schedule: str, pp: int, r: int, m: int, vpp: int) -> list:
    from trident.parallel.pipeline.schedule import schedule_steps

    backs = [s for s in schedule_steps(schedule, pp, r, m, vpp) if s.kind == "B"]
    split = schedule == "zb-h1"
    return [(s.mb, (not split) and i == len(backs) - 1) for i, s in enumerate(backs)] + ["grad_sync"]


def _run_case(index: int, case: dict, topo, released: list) -> None:
    import torch
    import torch.distributed as dist

    from equivalence import gather_checked, reference_step, rel_err
    from test_pipeline_equivalence import _global_batch
    from trident.model.gpt import GPT
    from trident.model.stage import build_stage
    from trident.parallel.collectives import all_reduce
    from trident.parallel.pipeline.executor import run_pipeline
    from trident.parallel.pipeline.p2p import activation_shape
    from trident.parallel.pipeline.schedule import in_flight_limit
    from trident.parallel.tensor.sharding import global_shapes
    from trident.parallel.topology import Topology

    rank = dist.get_rank()
    cfg, m, vpp = _config(case["tied"]), case["m"], case["vpp"]
    where = ", ".join(f"{k}={case[k]}" for k in KEYS)
    rows = topo.dp * m * MBS
    data = _global_batch(cfg, rows, case["packed"], seed=100 + index)
    shapes = global_shapes(GPT(cfg, Topology.single()))
    ref = torch.zeros(1, dtype=torch.float64)
    if rank == 0:  # the single-process step (reference_step also computes the logits: cheap here)
        reference = reference_step(cfg, data)
        ref_grads, ref[0] = reference["grads"], reference["loss"].item()
    dist.broadcast(ref, src=0)

    first = topo.dp_rank * m * MBS
    micro = [{k: v[first + i * MBS : first + (i + 1) * MBS] for k, v in data.items()} for i in range(m)]
    model = build_stage(cfg, topo, sequence_parallel=case["sp"], recompute=case["recompute"], vpp=vpp)
    model.init_weights(0)
    shape = activation_shape(MBS, SEQ, cfg.hidden, topo.tp, case["sp"])
    kw = {"act_shape": shape, "loss_divisor": rows * SEQ, "schedule": case["schedule"], "vpp": vpp}
    if case["evaluate"]:
        ev = run_pipeline(model, topo, micro, forward_only=True, **kw)
        assert abs(ev.loss / ref[0].item() - 1) <= TOL, f"{where}: eval loss {ev.loss} vs {ref[0].item()}"
        assert all(p.grad is None for p in model.parameters()), f"{where}: evaluation left gradients"

    calls: list = []

    def dp_all_reduce() -> None:
        calls.append("grad_sync")
        for p in model.parameters():
            all_reduce(p.grad, topo.dp_group)

    before = len(released)
    res = run_pipeline(model, topo, micro, grad_sync=dp_all_reduce,
                       before_backward=lambda mb, last: calls.append((mb, last)), **kw)
    assert calls == _expected_hooks(case["schedule"], topo.pp, topo.pp_rank, m, vpp), f"{where}: hooks {calls}"
    limit = in_flight_limit(case["schedule"], topo.pp, topo.pp_rank, m, vpp)
    assert res.peak_in_flight == res.in_flight_limit == limit, f"{where}: peak {res.peak_in_flight} vs {limit}"
    sent = m * vpp - (m if topo.is_last_stage else 0)  # every chunk's output but the loss chunk's
    assert released[before:] == [True] * sent, f"{where}: released {released[before:]}, {sent} outputs sent"
    assert abs(res.loss / ref[0].item() - 1) <= TOL, f"{where}: loss {res.loss} vs {ref[0].item()}"
    grads = gather_checked(model, dist.group.WORLD, grads=True, names=shapes)
    if rank == 0:
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            err = rel_err(g, ref_grads[name])
            assert err <= TOL, f"{where}: gradient of {name} differs, relative error {err:.2e}"


def _check_schedules() -> list[str]:
    import trident.parallel.pipeline.stage_run as stage_run
    from trident.parallel.tensor.weight_grad import WeightGradStore
    from trident.parallel.topology import Topology

    topos = {(tp, pp): Topology.from_initialized(tp=tp, pp=pp) for tp, pp in LAYOUTS}
    released: list[bool] = []
    deferred: list[int] = []
    original, run_w = stage_run.release, WeightGradStore.run

    def counting_release(out):
        original(out)
        released.append(out.untyped_storage().nbytes() == out.element_size())

    def counting_run(store):
        deferred.append(len(store))
        run_w(store)

    stage_run.release, WeightGradStore.run = counting_release, counting_run
    checked = []
    try:
        for index, values in enumerate(CASES):
            case = dict(zip(KEYS, values))
            before = len(deferred)
            _run_case(index, case, topos[(case["tp"], case["pp"])], released)
            if case["schedule"] == "zb-h1":  # every W ran the weight gradients of all 4 linears per layer
                size = 4 * (8 // case["pp"])  # (never the head's: it would keep a logits-sized gradient)
                assert deferred[before:] == [size] * case["m"], f"case {index}: W sizes {deferred[before:]}"
            checked.append(case["schedule"])
    finally:
        stage_run.release, WeightGradStore.run = original, run_w
    return checked


def test_interleaved_and_zero_bubble_match_single_process(dist_pool):
    results = dist_pool.run(4, "test_pipeline_schedules:_check_schedules", timeout=600)
    assert all(len(r) == len(CASES) for r in results)


def test_released_output_keeps_its_graph_and_gradient():
    """A stage output whose storage was released back-propagates the same gradients."""
    import torch

    from trident.parallel.pipeline.stage_run import release

    torch.manual_seed(0)
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)
    grad = torch.randn(4, 8)
    grads = []
    for free in (False, True):
        w.grad = x.grad = None
        out = torch.tanh(x @ w) + x  # the last op (add) keeps nothing of its output
        if free:
            release(out)
            assert out.untyped_storage().nbytes() == out.element_size() and out.shape == (4, 8)
        torch.autograd.backward(out, grad)
        grads.append((w.grad.clone(), x.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_split_backward_feeds_the_gradient_buffer_under_the_activation_meter():
    """ZB-H1's deferred weight gradients reach the fp32 gradient buffer exactly as 1F1B's,
    also while the activation meter's saved-tensor hooks are on (they hand backward other
    tensor objects than the parameters, and a W must accumulate through the real one)."""
    import torch

    from trident.parallel.pipeline.executor import run_pipeline
    from trident.parallel.pipeline.p2p import activation_shape
    from trident.parallel.random import RNGStreams
    from trident.parallel.topology import Topology
    from trident.tools.bench_train import synthetic_batch
    from trident.training.build import build_model, build_optimizer
    from trident.training.config import load_config
    from trident.training.memory import ActivationMeter

    overrides = ["model.n_layers=2", "model.hidden=64", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=128",
                 "model.max_seq_len=32", "data.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=8",
                 "model.vocab_size=512", "data.vocab_size=512"]
    grads = {}
    for schedule in ("1f1b", "zb-h1"):
        from cli_helpers import CONFIG

        cfg = load_config(str(CONFIG), overrides + [f"parallel.pp_schedule={schedule}"])
        topo = Topology.single()
        model = build_model(cfg, topo, RNGStreams(cfg.train.seed, topo))
        opt = build_optimizer(cfg, model, topo)
        micros = synthetic_batch(cfg, 4, seed=0)
        opt.zero_grad()
        with ActivationMeter(model):
            run_pipeline(model, topo, micros, act_shape=activation_shape(2, 32, 64), loss_divisor=8 * 32,
                         schedule=schedule, grad_sync=opt.grad_sync, before_backward=opt.before_backward)
        grads[schedule] = torch.cat([b.main_grad.clone() for b in opt.buffer.buckets])
    assert grads["1f1b"].abs().sum() > 0
    assert torch.equal(grads["1f1b"], grads["zb-h1"])
