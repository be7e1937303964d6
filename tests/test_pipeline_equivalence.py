"""The core promise through the pipeline: one step's loss and every gradient equal the
single-process model's, at (tp, pp) in {(1,2), (1,4), (2,2)} and m in {1, p, 2p+1}.

One task on 4 gloo ranks loops over every case (so the workers pay for one rendezvous):
(1,2) runs as two data-parallel pipelines, which also checks that the per-token
normalisation over the whole global batch makes dp invisible. Cases cover tied and
untied embeddings, balanced-but-uneven and explicit uneven splits, 1F1B and GPipe,
sequence parallelism, packed documents and forward-only evaluation. The reference runs
the same global batch (all microbatches of all dp ranks) in one process.
"""

from __future__ import annotations

import dataclasses

TOL = 1e-5
SEQ = 16
MBS = 2  # micro batch size
LAYOUTS = [(1, 2), (1, 4), (2, 2)]  # (tp, pp); dp = 4 / (tp * pp)


def _config(tied: bool):
    from equivalence import VARIANTS

    name = "mha-learned-layernorm-gelu-tied" if tied else "gqa-rope-rmsnorm-swiglu-untied"
    return dataclasses.replace(VARIANTS[name], n_layers=5)  # 5 layers: every balanced split is uneven


def _cases() -> list[dict]:
    cases = []
    for tp, pp in LAYOUTS:
        for m in (1, pp, 2 * pp + 1):
            for tied in (False, True):
                cases.append(
                    {
                        "tp": tp,
                        "pp": pp,
                        "m": m,
                        "tied": tied,
                        "sp": tp > 1 and m == pp,
                        "packed": m == 2 * pp + 1,
                        "split": [1, 4] if (tp, pp) == (1, 2) and tied else None,
                        "schedule": "gpipe" if pp == 4 and m == pp else "1f1b",
                        "evaluate": m == 2 * pp + 1,
                    }
                )
    return cases


def _global_batch(cfg, rows: int, packed: bool, seed: int) -> dict:
    import torch

    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (rows, SEQ + 1), generator=gen)
    data = {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}
    if packed:  # documents of random lengths packed into every row
        starts = torch.rand(rows, SEQ, generator=gen) < 0.25
        starts[:, 0] = False
        data["doc_ids"] = starts.long().cumsum(1)
    return data


def _bad_inputs(topos: dict) -> list[str]:
    """User errors raise one sentence on every rank before any transfer (no hang)."""
    from trident.errors import UserError
    from trident.model.stage import build_stage
    from trident.parallel.pipeline.executor import run_pipeline

    messages = []
    attempts = [
        lambda: build_stage(dataclasses.replace(_config(False), n_layers=3), topos[(1, 4)]),
        lambda: build_stage(_config(False), topos[(1, 2)], split=[5, 0]),
        lambda: build_stage(_config(False), topos[(1, 2)], split=[2, 2]),
        lambda: run_pipeline(build_stage(_config(False), topos[(1, 2)]), topos[(1, 2)], [], act_shape=(MBS, SEQ, 64),
                             loss_divisor=1.0),
    ]
    for attempt in attempts:
        try:
            attempt()
        except UserError as err:
            messages.append(str(err))
        else:
            raise AssertionError("a bad pipeline input was accepted")
    return messages


def _check_pipeline_equivalence() -> dict:
    import torch
    import torch.distributed as dist

    from equivalence import gather_checked, rel_err
    from trident.model.gpt import GPT
    from trident.parallel.collectives import all_reduce
    from trident.parallel.pipeline.p2p import activation_shape
    from trident.parallel.tensor.sharding import global_shapes, pieces_of, tp_replicas
    from trident.parallel.topology import Topology
    from trident.model.stage import build_stage
    from trident.parallel.pipeline.executor import run_pipeline
    from trident.parallel.tensor.sharding import is_pipeline_duplicate

    rank, world = dist.get_rank(), dist.get_world_size()
    topos = {(tp, pp): Topology.from_initialized(tp=tp, pp=pp) for tp, pp in LAYOUTS}
    checked: list[str] = []
    peaks: list[list[int]] = []
    for index, case in enumerate(_cases()):
        topo = topos[(case["tp"], case["pp"])]
        cfg, m, sp = _config(case["tied"]), case["m"], case["sp"]
        where = ", ".join(f"{k}={v}" for k, v in case.items())
        rows = topo.dp * m * MBS
        data = _global_batch(cfg, rows, case["packed"], seed=index)

        # the single-process reference (rank 0 only), then its loss to everyone
        ref_model = GPT(cfg, Topology.single())
        shapes = global_shapes(ref_model)
        ref = torch.zeros(2, dtype=torch.float64)
        if rank == 0:
            ref_model.init_weights(0)
            loss = ref_model(data["tokens"], labels=data["labels"], doc_ids=data.get("doc_ids")).mean()
            loss.backward()
            ref_grads = gather_checked(ref_model, None, grads=True)
            ref[0] = loss.item()
            ref[1] = sum(g.double().pow(2).sum() for g in ref_grads.values())
        dist.broadcast(ref, src=0)

        # this rank's microbatches: its dp share of the global batch, cut into m pieces
        first = topo.dp_rank * m * MBS
        micro = [{k: v[first + i * MBS : first + (i + 1) * MBS] for k, v in data.items()} for i in range(m)]
        model = build_stage(cfg, topo, split=case["split"], sequence_parallel=sp)
        model.init_weights(0)
        shape = activation_shape(MBS, SEQ, cfg.hidden, topo.tp, sp)
        divisor = rows * SEQ

        if case["evaluate"]:
            ev = run_pipeline(model, topo, micro, act_shape=shape, loss_divisor=divisor, forward_only=True)
            assert abs(ev.loss / ref[0].item() - 1) <= TOL, f"{where}: eval loss {ev.loss} vs {ref[0].item()}"
            assert all(p.grad is None for p in model.parameters()), f"{where}: evaluation left gradients"

        calls: list[object] = []

        def dp_all_reduce() -> None:
            calls.append("grad_sync")
            grads = [p.grad for p in model.parameters()]
            flat = torch.cat([g.reshape(-1) for g in grads])
            all_reduce(flat, topo.dp_group)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

        res = run_pipeline(
            model, topo, micro, act_shape=shape, loss_divisor=divisor, schedule=case["schedule"],
            grad_sync=dp_all_reduce, before_backward=lambda mb, last: calls.append((mb, last)),
        )
        # hooks: one call per backward, only the final one marked last, then one grad_sync
        assert calls == [(i, i == m - 1) for i in range(m)] + ["grad_sync"], f"{where}: hook calls {calls}"
        expect_peak = min(topo.pp - topo.pp_rank, m) if case["schedule"] == "1f1b" else m
        assert res.peak_in_flight == expect_peak <= res.in_flight_limit, f"{where}: peak {res.peak_in_flight}"
        peaks.append([case["pp"], topo.pp_rank, m, res.peak_in_flight])
        # the loss is the global-batch loss on every rank, not just the last stage
        assert abs(res.loss / ref[0].item() - 1) <= TOL, f"{where}: loss {res.loss} vs {ref[0].item()}"

        # both copies of a tied embedding hold the same (summed) gradient
        if case["tied"] and topo.pp > 1 and hasattr(model, "embedding"):
            g = model.embedding.weight.grad
            both = all_reduce(g.clone(), topo.embedding_group)
            assert rel_err(both, 2 * g) <= 1e-6, f"{where}: tied embedding copies differ"
        # the norm from shards counts the duplicate once when it is skipped as documented
        sq = torch.zeros((), dtype=torch.float64)
        for name, param in model.named_parameters():
            if is_pipeline_duplicate(param):
                continue
            for piece in pieces_of(param, name.rpartition(".")[2]):
                piece_grad = param.grad.narrow(piece.dim, piece.local_start, piece.length)
                sq += piece_grad.double().pow(2).sum() / tp_replicas(piece, topo.tp)
        sq = all_reduce(sq, dist.group.WORLD) / topo.dp  # dp replicas hold the same gradients
        assert abs(sq.item() / ref[1].item() - 1) <= 1e-6, f"{where}: grad norm^2 {sq.item()} vs {ref[1].item()}"

        grads = gather_checked(model, dist.group.WORLD, grads=True, names=shapes)
        if rank == 0:
            assert grads.keys() == ref_grads.keys()
            for name, g in grads.items():
                err = rel_err(g, ref_grads[name])
                assert err <= TOL, f"{where}: gradient of {name} differs, relative error {err:.2e}"
        checked.append(where)
    return {"checked": checked, "peaks": peaks, "errors": _bad_inputs(topos), "world": world}


def test_pipeline_matches_single_process(dist_pool):
    results = dist_pool.run(4, "test_pipeline_equivalence:_check_pipeline_equivalence", timeout=600)
    assert len(results[0]["checked"]) == len(_cases()) == 18
    # every stage of every case reports the 1F1B bound p - r (capped at m), GPipe m
    for result in results:
        for pp, r, m, peak in result["peaks"]:
            assert peak <= (m if pp == 4 and m == pp else min(pp - r, m))
    errors = [r["errors"] for r in results]
    assert all(e == errors[0] for e in errors), "ranks disagree on the error sentence"
    assert "pp=4 is more than model.n_layers=3" in errors[0][0]
    assert "has a stage with 0 layers" in errors[0][1]
    assert "sums to 4 layers but model.n_layers=5" in errors[0][2]
    assert "at least one microbatch" in errors[0][3]
