"""A dry run at scale: rank R of an N-rank job, built for real in one process, alone.

`trident train --dry-run --world N --rank R` runs what a rank of the real job runs at
start-up, with the real code: the `Topology` and every process group of a world of N,
this rank's model shard (`trident.training.build.build_model`), its ZeRO-sharded optimizer
(`build_optimizer`), its data indices and dp share (`trident.training.data_setup.build_data`)
and the names of the checkpoint files it would write (the checkpoint writer itself). So the
paths that only break at scale (group creation at world 1,024, shard and bucket arithmetic,
index builds, per-rank file naming) run in CI on two cores, and a user can check a layout
before queueing for a thousand GPUs.

Two things make that possible without N processes or the memory of one rank:

* torch's ``fake`` process-group backend (`torch.testing._internal.distributed.fake_pg`, as
  torchtitan's ``fake_backend`` comm mode uses): groups are created as in a real job and
  every collective returns at once, leaving its tensors as they are. `fake_world` refuses
  to start in a process that already belongs to a job or runs under a launcher, and
  removes the group on the way out, so a real run never talks to it;
* the meta device: parameters, gradient buckets and optimizer state have their real shapes
  and dtypes and no storage, so byte counts are exact and building a 70B shard takes
  seconds. Parameter values are not generated (there is nowhere to put them).

The counted bytes are compared with `trident plan`'s for the same layout
(`trident.planning.plan_state` mirrors the gradient buffer's packing, so they must be
equal, byte for byte); a difference is a bug in one of them.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

from trident.checkpoint.checkpoint import _rank_files
from trident.data.gpt_dataset import default_cache_dir
from trident.errors import UserError
from trident.parallel.random import RNGStreams
from trident.parallel.topology import Topology
from trident.parallel.zero.optimizer import DistributedOptimizer
from trident.planning.planner import make_plan, settings_from_config
from trident.training.build import build_model, build_optimizer
from trident.training.config import Config, derive
from trident.training.data_setup import build_data

# The keys of `DistributedOptimizer.memory()` that `trident plan` predicts (`StateBytes`).
COMPARED = ("numel", "padded_numel", "param_bytes", "param_peak_bytes", "grad_bytes", "grad_peak_bytes",
            "optimizer_bytes")
LAUNCHER_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass
class DryRunReport:
    """What one rank of the simulated job built, and what `trident plan` predicts for it."""

    config: str | None
    world: int
    rank: int
    layout: dict[str, int]  # tp, cp, pp, dp, ep
    coords: dict[str, int]  # this rank's tp, cp, pp, dp, ep ranks
    dtype: str
    zero: int
    layers: list[int]  # the transformer layers this rank's stage holds
    buckets: int  # gradient buckets (ZeRO-3: units)
    shard_numel: int  # elements of them this rank owns (optimizer state; expert buckets 1/(dp/ep) of each)
    built: dict[str, int]  # `DistributedOptimizer.memory()`, the COMPARED keys it has
    planned: dict[str, int]  # `trident plan`'s `StateBytes` for this rank's stage, same keys
    times: dict[str, float]  # seconds: topology_s, model_s, optimizer_s (and index_s with data)
    checkpoint_files: list[str]
    data: dict[str, Any] | None = None  # None without data.prefix
    notes: list[str] = field(default_factory=list)

    @property
    def mismatches(self) -> dict[str, tuple[int, int]]:
        """{key: (built, planned)} where the planner's prediction differs from the build."""
        return {k: (v, self.planned[k]) for k, v in self.built.items() if self.planned[k] != v}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mismatches"] = {k: list(v) for k, v in self.mismatches.items()}
        return out


@contextlib.contextmanager
def fake_world(world: int, rank: int) -> Iterator[None]:
    """torch.distributed as rank `rank` of `world` over the fake backend, for the body only.

    Never in a process that is (or is about to be) a rank of a real job: then the fake group
    would stand in for the real one, and collectives would "succeed" without communicating.
    """
    if dist.is_initialized():
        raise UserError(
            f"a dry run needs a process of its own, but this one already belongs to a job of "
            f"{dist.get_world_size()} ranks ({dist.get_backend()}); run the dry run on its own"
        )
    launcher = [k for k in LAUNCHER_KEYS if k in os.environ]
    if launcher:
        raise UserError(
            f"a dry run simulates its ranks in one process, but launcher variables {launcher} are set; "
            f"run `trident train --dry-run` directly, without torchrun or --nproc"
        )
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def dry_run(cfg: Config, world: int, rank: int, config_name: str | None = None) -> DryRunReport:
    """Build rank `rank` of a `world`-rank job from `cfg` (parallel.tp/cp/pp/ep; dp derived).

    Every check a real start makes runs first and raises one sentence: the layout against
    the world, the batch against the layout, the rank against the world.
    """
    if not isinstance(world, int) or world < 1:
        raise UserError(f"--world must be a whole number of ranks >= 1, got {world!r}")
    derived = derive(cfg, world)
    if not isinstance(rank, int) or not 0 <= rank < world:
        raise UserError(f"--rank {rank!r} is outside a world of {world} ranks; valid ranks are 0..{world - 1}")
    plan = make_plan(cfg.model, settings_from_config(cfg, dp=derived.dp))
    p, times = cfg.parallel, {}
    # the first meta-device operation imports torch's meta kernels (seconds, once per
    # process): paid here, so that the model's time is the model's
    torch.arange(0, 2, dtype=torch.float64, device="meta")
    with fake_world(world, rank):
        start = time.perf_counter()
        topo = Topology.from_initialized(p.tp, p.pp, derived.dp, device="meta", cp=p.cp, ep=p.ep)
        times["topology_s"] = _lap(start)
        start = time.perf_counter()
        rng = RNGStreams(cfg.train.seed, topo)
        model = build_model(cfg, topo, rng)
        times["model_s"] = _lap(start)
        start = time.perf_counter()
        optimizer = build_optimizer(cfg, model, topo)
        times["optimizer_s"] = _lap(start)
        data = data_share(cfg, topo)
        if data is not None:
            times["index_s"] = data.pop("index_s")
        files = checkpoint_files(topo, optimizer, rng)
    memory = optimizer.memory()
    state = asdict(plan.stages[topo.pp_rank].state)
    built = {k: int(memory[k]) for k in COMPARED if k in memory}
    notes = ["meta device: shapes, dtypes and bytes are real; parameter values are not generated"]
    if data is None:
        notes.append("no data.prefix: data indices not built (give data.prefix=[...] and data.tokenizer=...)")
    return DryRunReport(
        config=config_name, world=world, rank=rank,
        layout={"tp": topo.tp, "cp": topo.cp, "pp": topo.pp, "dp": topo.dp, "ep": topo.ep},
        coords={"tp": topo.tp_rank, "cp": topo.cp_rank, "pp": topo.pp_rank, "dp": topo.dp_rank, "ep": topo.ep_rank},
        dtype=cfg.train.dtype, zero=cfg.optim.zero, layers=plan.stages[topo.pp_rank].layers,
        buckets=int(memory["buckets"]), shard_numel=int(memory["shard_numel"]),
        built=built, planned={k: int(state[k]) for k in built}, times=times, checkpoint_files=files,
        data=data, notes=notes,
    )


def _lap(start: float) -> float:
    return round(time.perf_counter() - start, 4)


def data_share(cfg: Config, topo: Topology) -> dict[str, Any] | None:
    """This rank's datasets and loader, as a real start builds them (`build_data`), and its
    share of the first global batch; None when the config names no dataset (the default
    corpus would be tokenised first, which is a different job)."""
    d = cfg.data
    if d.prefix is None:
        return None
    caches = {default_cache_dir(prefix) for prefix in d.prefix}
    before = _cache_entries(caches)
    start = time.perf_counter()
    bundle = build_data(cfg, topo)
    index_s = _lap(start)
    loader = bundle.train
    share = loader.rank_microbatch_indices(loader.consumed_samples)  # [microbatches, micro_batch]
    sample = loader.dataset[int(share[0, 0])]  # resolves the shuffle, sample and document indices
    return {
        "index_s": index_s,
        "index_cache": "built" if _cache_entries(caches) - before else "loaded",
        "train_samples": len(loader.dataset),
        "valid_samples": len(bundle.valid.dataset) if bundle.valid is not None else 0,
        "microbatches": loader.num_microbatches,
        "micro_batch_size": loader.micro_batch_size,
        "first_step_indices": [int(i) for i in share.reshape(-1)],
        "first_sample_tokens": int(len(sample["tokens"])),
    }


def _cache_entries(dirs: set[Path]) -> set[Path]:
    """The index-cache manifests in `dirs` (one per built entry)."""
    return {path for d in dirs if d.is_dir() for path in d.glob("*.json")}


def checkpoint_files(topo: Topology, optimizer: DistributedOptimizer, rng: RNGStreams) -> list[str]:
    """The files this rank writes into a checkpoint, named by the checkpoint code itself.

    `_rank_files` is what `save_checkpoint` writes from; it runs here with this rank's real
    topology, ZeRO stage and RNG streams, on an empty stand-in for the model and the
    optimizer state (a meta shard has no values to write), and nothing is written: its
    names, not a copy of its naming rule.
    """
    stand_in = SimpleNamespace(cfg=optimizer.cfg, state_dict=lambda: {"tensors": {}, "meta": {}})
    return sorted(_rank_files(topo, nn.Module(), stand_in, rng))


# --- the report -------------------------------------------------------------------------------
def _coords(r: DryRunReport) -> str:
    order = ("tp", "cp", "pp", "dp") if r.layout["cp"] > 1 else ("tp", "pp", "dp")
    order += ("ep",) if r.layout["ep"] > 1 else ()
    return ", ".join(f"{k} {r.coords[k]}/{r.layout[k]}" for k in order)


def _layers(layers: list[int]) -> str:
    if not layers:
        return "no layers"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"layers {layers[0]}-{layers[-1]}"
    return "layers " + ",".join(map(str, layers))


ROWS = {
    "numel": "parameters (elements)", "padded_numel": "  with bucket padding", "param_bytes": "parameter bytes",
    "param_peak_bytes": "  peak in a step", "grad_bytes": "gradient bytes", "grad_peak_bytes": "  peak in a step",
    "optimizer_bytes": "optimizer state bytes",
}


def format_report(r: DryRunReport) -> str:
    """The report as a table a person reads."""
    shards = r.layout["dp"] * r.layout["cp"]
    experts = f", experts' 1/{shards // r.layout['ep']}" if r.layout["ep"] > 1 else ""
    lines = [
        f"trident dry run: {r.config or 'defaults'} as rank {r.rank} of {r.world} ({_coords(r)}), "
        f"{r.dtype}, ZeRO-{r.zero}, meta device",
        f"stage {r.coords['pp']}: {_layers(r.layers)}; {r.buckets} gradient {'units' if r.zero == 3 else 'buckets'}, "
        f"this rank owns {r.shard_numel:,} elements of them "
        f"({'all' if r.zero == 0 else f'1/{shards} of each{experts}'})",
        "",
        f"{'per rank':<24}{'built':>18}{'trident plan':>18}",
    ]
    for key, built in r.built.items():
        planned = r.planned[key]
        lines.append(f"{ROWS[key]:<24}{built:>18,}{planned:>18,}  {'equal' if built == planned else 'DIFFERENT'}")
    t = r.times
    timing = (f"process groups {t['topology_s']:.2f} s, model shard {t['model_s']:.2f} s (meta: no values), "
              f"optimizer {t['optimizer_s']:.2f} s")
    lines += ["", f"{'time':<12}{timing}"]
    if r.data is not None:
        d = r.data
        first = ", ".join(map(str, d["first_step_indices"][:8])) + (", ..." if len(d["first_step_indices"]) > 8 else "")
        lines += [
            f"{'data':<12}indices {t['index_s']:.2f} s ({d['index_cache']}): {d['train_samples']:,} train and "
            f"{d['valid_samples']:,} validation samples",
            f"{'':<12}this rank reads {d['microbatches']} microbatches x {d['micro_batch_size']} samples a step; "
            f"step 1: samples {first}",
        ]
    lines.append(f"{'checkpoint':<12}{len(r.checkpoint_files)} files: {', '.join(r.checkpoint_files)}")
    lines += [f"{'note':<12}{n}" for n in r.notes]
    return "\n".join(lines)
