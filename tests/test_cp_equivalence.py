"""Context parallelism keeps the core promise: at every (tp, cp, pp, dp) layout the loss,
every gradient and the parameters after several AdamW steps equal one process.

The model is a tiny llama (RoPE, GQA, SwiGLU) with tied embeddings and QK-norm, trained
on packed rows whose document boundaries fall inside and across the cp chunks, with
document masking on: positions reset per document and each K/V block the ring brings is
masked by (document, global position). Every step runs through the pipeline executor,
which cuts each microbatch to the rank's s/cp tokens; gradients are reduced over dp x cp
and ZeRO-1 shards the optimizer over dp x cp.
"""

from __future__ import annotations

import pytest

TOL = 1e-5
STEPS = 3
ROWS = 4  # sequences per global batch
SEQ = 16
MICRO = 2  # microbatches per dp rank
OPTIM = dict(lr=3e-3, weight_decay=0.1, decay_embeddings=False, beta1=0.9, beta2=0.95, eps=1e-6, clip_grad=1.0)

# (tp, cp, pp, dp) by world size
LAYOUTS = {
    2: [(1, 2, 1, 1)],
    4: [(1, 4, 1, 1), (2, 2, 1, 1), (1, 2, 2, 1), (1, 2, 1, 2)],
    8: [(2, 2, 2, 1)],
}


def config():
    from trident.model.config import preset

    return preset("tiny", tie_embeddings=True, qk_norm=True, vocab_pad_multiple=8)


def global_batch(cfg, step: int) -> dict:
    """Packed rows: several documents of uneven lengths per row, one row a single document."""
    import torch

    gen = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, cfg.vocab_size, (ROWS, SEQ + 1), generator=gen)
    doc = torch.zeros(ROWS, SEQ, dtype=torch.long)
    for r in range(1, ROWS):  # row 0 holds one document
        cuts = sorted(torch.randperm(SEQ - 1, generator=gen)[: r + 1].add(1).tolist())
        for c in cuts:
            doc[r, c:] += 1
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(), "doc_ids": doc}


def reference(cfg) -> dict:
    """One process: the first step's gradients, then AdamW steps (losses, norms, parameters)."""
    import torch
    from equivalence import gather_checked

    from trident.model.gpt import GPT
    from trident.parallel.tensor.sharding import global_shapes
    from trident.parallel.topology import Topology
    from trident.parallel.zero.optimizer import split_decay

    model = GPT(cfg, Topology.single())
    model.init_weights(0)
    named = dict(model.named_parameters())
    decay, no_decay = split_decay(model, OPTIM["decay_embeddings"])
    opt = torch.optim.AdamW(
        [{"params": [named[n] for n in decay], "weight_decay": OPTIM["weight_decay"]},
         {"params": [named[n] for n in no_decay], "weight_decay": 0.0}],
        lr=OPTIM["lr"], betas=(OPTIM["beta1"], OPTIM["beta2"]), eps=OPTIM["eps"],
    )
    out: dict = {"losses": [], "norms": []}
    for step in range(STEPS):
        data = global_batch(cfg, step)
        opt.zero_grad()
        loss = model(data["tokens"], labels=data["labels"], doc_ids=data["doc_ids"]).mean()
        loss.backward()
        if step == 0:
            out["grads"] = gather_checked(model, None, grads=True)
        out["norms"].append(torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM["clip_grad"]).item())
        opt.step()
        out["losses"].append(loss.item())
    out["params"] = gather_checked(model, None)
    out["shapes"] = global_shapes(model)  # gathers at tp > 1 use these (no vocabulary padding)
    return out


def microbatches(data: dict, topo) -> list[dict]:
    """This dp rank's rows cut into MICRO microbatches of whole sequences (the executor cuts
    the cp share)."""
    per = ROWS // topo.dp
    rows = {k: v[topo.dp_rank * per : (topo.dp_rank + 1) * per] for k, v in data.items()}
    size = per // MICRO
    return [{k: v[i * size : (i + 1) * size] for k, v in rows.items()} for i in range(MICRO)]


def _run(model, topo, data, **kw):
    from trident.parallel.pipeline.executor import run_pipeline
    from trident.parallel.pipeline.p2p import activation_shape

    mbs = microbatches(data, topo)
    sp = model.sp
    shape = activation_shape(mbs[0]["tokens"].shape[0], SEQ, model.cfg.hidden, topo.tp, sp, topo.cp)
    return run_pipeline(model, topo, mbs, act_shape=shape, loss_divisor=ROWS * SEQ, **kw).loss


def _check_gradients(cfg, topo, ref: dict, sp: bool) -> tuple[float, float]:
    """The first step's loss and full gradients (summed over dp x cp by hand) vs one process."""
    import torch.distributed as dist
    from equivalence import gather_checked, rel_err

    from trident.model.stage import build_stage
    from trident.parallel.collectives import all_reduce

    model = build_stage(cfg, topo, sequence_parallel=sp)
    model.init_weights(0)
    loss = _run(model, topo, global_batch(cfg, 0))
    for p in model.parameters():
        all_reduce(p.grad, topo.dp_cp_group)
    grads = gather_checked(model, dist.group.WORLD, grads=True, names=ref["shapes"])
    assert grads.keys() == ref["grads"].keys()
    worst = max(rel_err(grads[n], g) for n, g in ref["grads"].items())
    return abs(loss / ref["losses"][0] - 1), worst


def _check_training(cfg, topo, ref: dict, sp: bool) -> dict:
    import torch.distributed as dist
    from equivalence import gather_checked, rel_err

    from trident.model.stage import build_stage
    from trident.parallel.zero.mixed_precision import MixedPrecisionConfig
    from trident.parallel.zero.optimizer import DistributedOptimizer, OptimizerConfig

    model = build_stage(cfg, topo, sequence_parallel=sp)
    model.init_weights(0)
    opt = DistributedOptimizer(model, topo, OptimizerConfig(**OPTIM, zero=1, bucket_mb=0.02),
                               MixedPrecisionConfig(dtype="fp32"))
    losses, norms = [], []
    for step in range(STEPS):
        opt.zero_grad()
        losses.append(_run(model, topo, global_batch(cfg, step), before_backward=opt.before_backward,
                           grad_sync=opt.grad_sync))
        norms.append(opt.step().grad_norm)
    params = gather_checked(model, dist.group.WORLD, names=ref["shapes"])
    return {
        "loss_errs": [abs(a / b - 1) for a, b in zip(losses, ref["losses"])],
        "norm_errs": [abs(a / b - 1) for a, b in zip(norms, ref["norms"])],
        "param_err": max(rel_err(params[n], p) for n, p in ref["params"].items()),
        "shard_numel": opt.memory()["shard_numel"],
    }


def _check_layouts(size: int) -> list[dict]:
    from trident.parallel.topology import Topology

    cfg = config()
    ref = reference(cfg)
    out = []
    for tp, cp, pp, dp in LAYOUTS[size]:
        topo = Topology.from_initialized(tp=tp, pp=pp, cp=cp)
        assert (topo.dp, topo.cp) == (dp, cp)
        sp = tp > 1
        loss_err, grad_err = _check_gradients(cfg, topo, ref, sp)
        out.append({"layout": [tp, cp, pp, dp], "loss_err": loss_err, "grad_err": grad_err,
                    **_check_training(cfg, topo, ref, sp)})
    return out


def _assert_close(results: list[dict]) -> None:
    for rank_results in results:
        for r in rank_results:
            where = f"(tp, cp, pp, dp) = {tuple(r['layout'])}"
            assert r["loss_err"] <= TOL, f"{where}: first loss differs by {r['loss_err']:.2e}"
            assert r["grad_err"] <= TOL, f"{where}: a gradient differs, relative error {r['grad_err']:.2e}"
            assert max(r["loss_errs"]) <= TOL, f"{where}: losses differ {r['loss_errs']}"
            assert max(r["norm_errs"]) <= 1e-6, f"{where}: gradient norms differ {r['norm_errs']}"
            assert r["param_err"] <= TOL, f"{where}: parameters after {STEPS} steps differ by {r['param_err']:.2e}"


def test_cp2_matches_single_process(dist_pool):
    _assert_close(dist_pool.run(2, "test_cp_equivalence:_check_layouts", timeout=180, size=2))


def test_cp_layouts_on_4_ranks_match_single_process(dist_pool):
    results = dist_pool.run(4, "test_cp_equivalence:_check_layouts", timeout=300, size=4)
    _assert_close(results)
    # ZeRO-1 shards over dp x cp: at (1, 4, 1, 1) each rank owns a quarter, as at (1, 2, 1, 2)
    by_layout = {tuple(r["layout"]): r["shard_numel"] for r in results[0]}
    assert by_layout[(1, 4, 1, 1)] == by_layout[(1, 2, 1, 2)]


def test_cp_with_tp_and_pp_matches_single_process(dist_pool):
    _assert_close(dist_pool.run(8, "test_cp_equivalence:_check_layouts", timeout=300, size=8))


def _check_variants(size: int) -> list[str]:
    """Every position scheme under cp, with recomputation: the model called directly on its
    s/cp tokens (the whole sequence's doc_ids), loss and every gradient against one process."""
    import torch.distributed as dist
    from equivalence import VARIANTS, gather_checked, reference_step, rel_err

    from trident.model.gpt import GPT
    from trident.parallel.collectives import all_reduce
    from trident.parallel.context.sharding import shard_microbatch
    from trident.parallel.tensor.layers import sync_tp_partial_grads
    from trident.parallel.topology import Topology

    checked = []
    tp = size // 2
    topo = Topology.from_initialized(tp=tp, cp=2)
    for name, cfg in VARIANTS.items():
        data = global_batch(cfg, 7)
        ref = reference_step(cfg, data)
        mine = shard_microbatch(data, topo.cp, topo.cp_rank)
        for recompute in ("none", "selective", "full"):
            model = GPT(cfg, topo, sequence_parallel=tp > 1, recompute=recompute)
            model.init_weights(0)
            loss = model(mine["tokens"], labels=mine["labels"], doc_ids=mine["doc_ids"]).sum() / data["labels"].numel()
            loss.backward()
            sync_tp_partial_grads(model, topo)
            for p in model.parameters():
                all_reduce(p.grad, topo.cp_group)
            grads = gather_checked(model, dist.group.WORLD, grads=True, names={n: g.shape for n, g in ref["grads"].items()})
            total = all_reduce(loss.detach().clone(), topo.cp_group)
            where = f"{name} tp={tp} cp=2 recompute={recompute}"
            assert rel_err(total, ref["loss"]) <= TOL, f"{where}: loss {total.item()} vs {ref['loss'].item()}"
            for n, g in ref["grads"].items():
                assert rel_err(grads[n], g) <= TOL, f"{where}: gradient of {n} differs by {rel_err(grads[n], g):.2e}"
            checked.append(where)
    return checked


@pytest.mark.parametrize("size", [2, 4], ids=["cp2", "tp2-cp2"])
def test_every_position_scheme_and_recompute_under_cp(dist_pool, size):
    checked = dist_pool.run(size, "test_cp_equivalence:_check_variants", timeout=240, size=size)
    assert len(checked[0]) == 12, checked[0]
