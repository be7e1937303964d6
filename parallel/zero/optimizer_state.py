"""The optimizer's state as files: save it by global tensor name, load it at any layout.

Each entry of a saved state names the global tensor, the piece of it that the local
parameter holds, and the parameter's flat element range the saving rank owned; the values
are one contiguous range of the piece's elements. That is all a resharding loader needs:
a state saved at one (tp, pp, dp, zero) loads at another, each rank reading (lazily, from
safetensors) only the stored ranges that overlap what it owns. `state_layout` has the
geometry of where those elements lie.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from trident.errors import UserError
from trident.parallel.tensor.sharding import global_name, pieces_of
from trident.parallel.zero.state_layout import (
    KINDS,
    assemble,
    block_runs,
    entry_runs,
    gather_runs,
    overlap,
    piece_range,
    read_values,
    scatter_values,
    span,
)

if TYPE_CHECKING:  # annotations only: the optimizer imports this module, not the reverse
    from trident.parallel.zero.optimizer import DistributedOptimizer

STATE_FORMAT = "trident-optimizer/1"


def local_entries(opt: "DistributedOptimizer") -> list[tuple[dict, int, int]]:
    """(metadata, bucket index, offset of the entry's first local element in the bucket's
    state range) for every (parameter piece x owned range) of this rank."""
    out = []
    for i, b in enumerate(opt.buffer.buckets):
        for slot in b.slots:
            s, e = max(b.shard_start, slot.start), min(b.shard_end, slot.start + slot.numel)
            if s >= e:
                continue
            a, z = s - slot.start, e - slot.start  # flat range within the parameter
            shape = tuple(slot.param.shape)
            for piece in pieces_of(slot.param, slot.name.rpartition(".")[2]):
                p0, p1 = piece_range(shape, piece, a, z)
                if p0 == p1:
                    continue
                gname = global_name(slot.name, piece)
                meta = {
                    "key": f"{gname}@{slot.name}[{a}:{z}]",
                    "global_name": gname,
                    "global_shape": list(piece.global_shape),
                    "param": slot.name,
                    "local_shape": list(shape),
                    "local_range": [a, z],
                    "piece": {"dim": piece.dim, "start": piece.start, "length": piece.length,
                              "local_start": piece.local_start, "replicas": piece.replicas},
                    "count": p1 - p0,
                    "duplicate": bool(opt.exclude(slot.name, slot.param)),
                }
                out.append((meta, i, s - b.shard_start))
    return out


def local_runs(opt: "DistributedOptimizer", kind: int, meta: dict, i: int, off: int) -> list[torch.Tensor]:
    """Views of this rank's state `KINDS[kind]` that hold `meta`'s values, in stored order."""
    src = (opt.master, opt.exp_avg, opt.exp_avg_sq)[kind][i]
    a, z = meta["local_range"]
    return entry_runs(meta, src[off : off + z - a], local=True)


def state_dict(opt: "DistributedOptimizer") -> dict:
    """``{"tensors": {name: fp32 tensor}, "meta": JSON-able}`` — safetensors-ready.

    Each entry of ``meta["entries"]`` names the global tensor, the piece of it that
    the local parameter holds, and the parameter's flat element range this rank owns;
    the stored values are one contiguous range of the piece's elements (`entry_runs`
    finds them in the global tensor), which is all a resharding loader needs.
    """
    tensors: dict[str, torch.Tensor] = {}
    entries = []
    # zero 0 replicates the state over dp and a checkpoint stores it once, but under expert
    # parallelism the ranks of one ep group hold different experts: each stores its experts,
    # and only dp rank 0 the dense state
    experts_only = opt.cfg.zero == 0 and opt.topo.dp_cp_rank != 0
    for meta, i, off in local_entries(opt):
        if experts_only and not opt.buffer.buckets[i].expert:
            continue
        for k, kind in enumerate(KINDS):
            tensors[f"{kind}/{meta['key']}"] = gather_runs(local_runs(opt, k, meta, i, off), meta["count"])
        entries.append(meta)
    t = opt.topo
    layout = {"tp": t.tp, "pp": t.pp, "dp": t.dp, "tp_rank": t.tp_rank, "pp_rank": t.pp_rank,
              "dp_rank": t.dp_rank, "zero": opt.cfg.zero}
    if t.cp > 1:  # informational: entries name global tensors and ranges, so a load ignores it
        layout.update(cp=t.cp, cp_rank=t.cp_rank)
    return {
        "tensors": tensors,
        "meta": {
            "format": STATE_FORMAT,
            "layout": layout,
            "step": opt.step_count,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            "loss_scaler": opt.scaler.state_dict(),
            "entries": entries,
        },
    }


@torch.no_grad()

def load_state_dict(opt: "DistributedOptimizer", states: dict | list[dict]) -> None:
    """Load from one or more ranks' `state_dict`s, saved at any layout and zero stage.

    Every element this rank owns must be present in `states` (its own state dict
    suffices at the same layout; give every rank's to change layout). Collective over
    dp (the updated parameters are all-gathered), so every rank must call it.

    A state's ``tensors`` is a dict of tensors or an open safetensors file (`safe_open`),
    which is read lazily (``get_slice``): only the stored entries, and of them only the
    element ranges, that overlap what this rank owns are read, so a resharding load
    costs about this rank's share of the state, not every rank's files.

    A saved entry holding exactly the elements a local entry needs (the same layout)
    is copied straight in; otherwise every saved entry of the same global tensor that
    overlaps it gives the overlap, read as one contiguous range of its stored values
    (`overlap`).
    """
    states = [states] if isinstance(states, dict) else list(states)
    for st in states:
        if st.get("meta", {}).get("format") != STATE_FORMAT:
            raise UserError(f"not an optimizer state of format {STATE_FORMAT!r}: {st.get('meta', {}).get('format')!r}")
    wanted: dict[str, list[tuple[dict, int, int]]] = {}
    for meta, i, off in local_entries(opt):
        wanted.setdefault(meta["global_name"], []).append((meta, i, off))
    saved: dict[str, list[tuple[dict, dict]]] = {}
    for st in states:
        for meta in st["meta"]["entries"]:
            if meta["global_name"] in wanted:
                saved.setdefault(meta["global_name"], []).append((meta, st["tensors"]))
    for gname, wants in wanted.items():
        _load_tensor(opt, gname, wants, saved.get(gname, []))
    meta0 = states[0]["meta"]
    opt.step_count = int(meta0["step"])
    # the lr is restored (the schedule sets it every step anyway); the weight decay stays
    # the run's config value, so a resumed or imported run decays as its config says
    for group, saved_group in zip(opt.param_groups, meta0["param_groups"]):
        group["lr"] = float(saved_group["lr"])
    opt.scaler.load_state_dict(meta0["loss_scaler"])
    opt.buffer.gather_params(opt.master)


def _load_tensor(
    opt: "DistributedOptimizer", gname: str, wants: list[tuple[dict, int, int]], sources: list[tuple[dict, object]]
) -> None:
    """Fill every local entry of global tensor `gname` from the saved entries of it."""
    shape = wants[0][0]["global_shape"]
    for meta, _ in sources:
        if list(meta["global_shape"]) != list(shape):
            raise UserError(f"the saved optimizer state holds {gname!r} with shape {meta['global_shape']}, "
                            f"this model's is {shape}")
    exact = {span(meta): (meta, tensors) for meta, tensors in sources}
    for meta, i, off in wants:
        hit = exact.get(span(meta))
        if hit is not None:  # the same layout: the stored values are exactly this entry's
            src_meta, tensors = hit
            for k, kind in enumerate(KINDS):
                scatter_values(read_values(tensors, f"{kind}/{src_meta['key']}"), local_runs(opt, k, meta, i, off))
            continue
        if any(src["piece"]["dim"] != meta["piece"]["dim"] for src, _ in sources):
            covered = _load_assembled(opt, meta, i, off, sources)  # sliced along another dim
        else:
            covered = _load_overlaps(opt, meta, i, off, sources)
        if not covered:
            t = opt.topo
            raise UserError(
                f"the given optimizer states lack elements of {gname!r} that dp rank {t.dp_rank} "
                f"(tp {t.tp_rank}, pp {t.pp_rank}) owns; pass the state dicts of every saved rank"
            )


def _load_overlaps(opt: "DistributedOptimizer", meta: dict, i: int, off: int, sources: list[tuple[dict, object]]) -> bool:
    """Fill local entry `meta` from the saved entries of its global tensor (sliced along
    the same dim) that overlap it, reading from each only the stored range spanning the
    overlap; returns whether every element was found. A saved entry whose overlap is
    already filled (a tp replica, a tied copy) is not read."""
    a, z = meta["local_range"]
    covered = torch.zeros(z - a, dtype=torch.bool)  # over the local flat range, like the state views
    for src, tensors in sources:
        ov = overlap(meta, src)
        if ov is None:
            continue
        q0, q1, row, local_base, local_stride, stored_base, stored_stride = ov
        mask = block_runs(covered, local_base, local_stride, row, q0, q1)
        if all(bool(r.all()) for r in mask):
            continue
        (o0, r0), (o1, r1) = divmod(q0, row), divmod(q1 - 1, row)
        lo, hi = stored_base + o0 * stored_stride + r0, stored_base + o1 * stored_stride + r1 + 1
        for k, kind in enumerate(KINDS):
            values = read_values(tensors, f"{kind}/{src['key']}", lo, hi)
            if values.numel() != hi - lo:
                raise UserError(f"optimizer entry {src['key']!r} stores fewer values than its metadata says")
            state = (opt.master, opt.exp_avg, opt.exp_avg_sq)[k][i][off : off + z - a]
            for dst, val in zip(block_runs(state, local_base, local_stride, row, q0, q1),
                                block_runs(values, stored_base - lo, stored_stride, row, q0, q1)):
                dst.copy_(val)
        for r in mask:
            r.fill_(True)
    return all(bool(r.all()) for r in entry_runs(meta, covered, local=True))


def _load_assembled(opt: "DistributedOptimizer", meta: dict, i: int, off: int, sources: list[tuple[dict, object]]) -> bool:
    """Fill local entry `meta` from its whole global tensor, assembled from every saved
    entry of it (read whole): for saved pieces cut along another dim than the local one."""
    full = assemble(sources, math.prod(meta["global_shape"]))
    if not all(bool(r.all()) for r in entry_runs(meta, full[-1])):
        return False
    for k in range(len(KINDS)):
        for dst, src in zip(local_runs(opt, k, meta, i, off), entry_runs(meta, full[k])):
            dst.copy_(src)
    return True
