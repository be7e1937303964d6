"""The core promise at tp: logits, loss and every gradient equal the single-process model.

For each architecture variant, on 4 gloo ranks: tp in {1, 2, 4} (tp=2 runs as two data
replicas of a tp=2 model), with and without sequence parallelism, with plain and with
document-masked packed inputs. Gradients are gathered back to full global tensors, and
the gradient norm assembled from shards equals the single-process norm.
"""

from __future__ import annotations

import pytest

from equivalence import VARIANTS, batch, gather_checked, reference_step, rel_err

TOL = 1e-5


def _check_variant(variant: str) -> list[str]:
    from trident.model.gpt import GPT
    from trident.parallel.tensor.layers import sync_tp_partial_grads
    from trident.parallel.collectives import all_reduce
    from trident.parallel.tensor.sharding import local_grad_sq_norm
    from trident.parallel.topology import Topology

    cfg = VARIANTS[variant]
    smoothing = 0.1 if variant.startswith("mqa") else 0.0
    checked = []
    for packed in (False, True):
        data = batch(cfg, packed=packed)
        ref = reference_step(cfg, data, label_smoothing=smoothing)
        for tp in (1, 2, 4):
            topo = Topology.from_initialized(tp=tp)
            for sp in (False, True) if tp > 1 else (False,):
                model = GPT(cfg, topo, sequence_parallel=sp)
                model.init_weights(0)
                doc = data.get("doc_ids")
                logits = model.full_logits(model(data["tokens"], doc_ids=doc))
                loss = model(data["tokens"], labels=data["labels"], doc_ids=doc, label_smoothing=smoothing).mean()
                loss.backward()
                sync_tp_partial_grads(model, topo)
                grads = gather_checked(model, topo.tp_group, grads=True)
                where = f"{variant} tp={tp} sp={sp} packed={packed}"
                assert rel_err(logits, ref["logits"]) <= TOL, f"{where}: logits differ {rel_err(logits, ref['logits'])}"
                assert rel_err(loss, ref["loss"]) <= TOL, f"{where}: loss {loss.item()} vs {ref['loss'].item()}"
                assert grads.keys() == ref["grads"].keys(), f"{where}: parameter names differ"
                for name, g in grads.items():
                    err = rel_err(g, ref["grads"][name])
                    assert err <= TOL, f"{where}: gradient of {name} differs, relative error {err:.2e}"
                    assert ref["grads"][name].abs().sum() > 0, f"{where}: {name} has no gradient at all"
                # the gradient norm from shards counts replicated values once
                sq = all_reduce(local_grad_sq_norm(model, tp), topo.tp_group)
                ref_sq = sum(g.double().pow(2).sum() for g in ref["grads"].values())
                assert abs(sq.item() / ref_sq.item() - 1) <= 1e-6, f"{where}: grad norm^2 {sq.item()} vs {ref_sq.item()}"
                checked.append(where)
    return checked


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tp_matches_single_process(dist_pool, variant):
    checked = dist_pool.run(4, "test_tp_equivalence:_check_variant", timeout=240, variant=variant)
    assert len(checked[0]) == 2 * (1 + 2 + 2)  # packed x (tp1 + tp2 x sp + tp4 x sp)


def _replica_check_catches_disagreement() -> dict:
    """`gather_checked` passes on agreeing replicas and names a replica that differs by one
    ulp, where the averaging `gather_full` alone would hide it."""
    import torch

    from equivalence import check_replicas_agree
    from trident.model.config import preset
    from trident.model.gpt import GPT
    from trident.parallel.tensor.sharding import iter_pieces
    from trident.parallel.topology import Topology

    topo = Topology.from_initialized(tp=2)
    model = GPT(preset("tiny", n_kv_heads=1), topo)  # one kv head: both tp ranks hold it
    model.init_weights(0)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    check_replicas_agree(model, topo.tp_group)
    check_replicas_agree(model, topo.tp_group, grads=True)
    messages = []
    for gname, grads in (("layers.0.norm1.weight", False), ("layers.1.attn.qkv.k.weight", True)):
        for _, param, name, piece in iter_pieces(model):
            if name == gname and topo.tp_rank == 1:
                target = (param.grad if grads else param).data.narrow(piece.dim, piece.local_start, piece.length)
                target.view(-1)[3] = torch.nextafter(target.view(-1)[3], torch.tensor(float("inf")))
        try:
            check_replicas_agree(model, topo.tp_group, grads=grads)
        except AssertionError as err:
            messages.append(str(err))
    return {"messages": messages}


def test_replica_check_names_replicas_that_disagree(dist_pool):
    for res in dist_pool.run(2, "test_tp_equivalence:_replica_check_catches_disagreement"):
        norm, kv = res["messages"]
        assert norm.startswith("replicas of layers.0.norm1.weight disagree before averaging: 1 of 64 replicated value")
        assert kv.startswith("replicas of layers.1.attn.qkv.k.weight disagree before averaging: 1 of 512 replicated gradient")
