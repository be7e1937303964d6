"""The process layout: sizes (tp, cp, pp, dp), this rank's coordinates, and its groups.

One owner for the layout. The arithmetic (`Layout`) is pure and unit-tested without
processes; `Topology` adds the process groups and is made once per process, then passed
in wherever it is needed (no module-global singleton).

Rank order is Megatron's: tp fastest, then cp, then dp, then pp, i.e. the grid is
``arange(world).reshape(pp, dp, cp, tp)``. A tensor-parallel group is therefore a run of
consecutive ranks, which keeps its heavy all-reduces inside one node, and a
context-parallel group (the ring attention's K/V traffic) is the next tightest.

Expert parallelism is carved out of the data-parallel ranks, as in Megatron: ``ep``
divides dp, and the dp group (for cp = 1) is seen as ``[edp, ep]`` with ep fastest, so an
expert-parallel group (`Topology.ep_group`: the ranks that exchange tokens with
all-to-all, each holding E/ep experts) is a run of consecutive dp ranks, and the
expert-data-parallel group (`Topology.edp_group`: the dp/ep ranks holding the same
experts) reduces, and ZeRO-shards, the expert parameters' gradients.

Context-parallel ranks hold different tokens of the same samples and the same weights,
so gradients are reduced, and ZeRO shards, over the combined ``dp × cp`` group
(`Topology.dp_cp_group`, Megatron's data-parallel group "with context parallel"); the
data loader still splits samples over dp only.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from trident.errors import UserError
from trident.parallel.heartbeat import Heartbeat

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Layout:
    """Sizes of the four parallel dimensions; world = tp * cp * pp * dp. `ep` (expert
    parallelism) divides dp and adds no ranks."""

    tp: int
    pp: int
    dp: int
    cp: int = 1
    ep: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    def grid(self) -> torch.Tensor:
        """Global ranks as a [pp, dp, cp, tp] grid."""
        return torch.arange(self.world).reshape(self.pp, self.dp, self.cp, self.tp)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of a global rank (`cp_of` gives its cp rank)."""
        if not 0 <= rank < self.world:
            raise UserError(f"rank {rank} is outside a world of {self.world} ranks (valid: 0..{self.world - 1})")
        return rank // (self.dp * self.cp * self.tp), (rank // (self.cp * self.tp)) % self.dp, rank % self.tp

    def cp_of(self, rank: int) -> int:
        """The context-parallel rank of a global rank."""
        return (rank // self.tp) % self.cp

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int, cp_rank: int = 0) -> int:
        return ((pp_rank * self.dp + dp_rank) * self.cp + cp_rank) * self.tp + tp_rank

    def tp_groups(self) -> list[list[int]]:
        return self.grid().reshape(-1, self.tp).tolist()

    def cp_groups(self) -> list[list[int]]:
        return self.grid().permute(0, 1, 3, 2).reshape(-1, self.cp).tolist()

    def dp_groups(self) -> list[list[int]]:
        return self.grid().permute(0, 2, 3, 1).reshape(-1, self.dp).tolist()

    def dp_cp_groups(self) -> list[list[int]]:
        """The ranks that hold the same weights (same pp and tp coordinates): gradient reduction and ZeRO."""
        return self.grid().permute(0, 3, 1, 2).reshape(-1, self.dp * self.cp).tolist()

    def ep_groups(self) -> list[list[int]]:
        """Runs of `ep` consecutive dp ranks (same pp, cp, tp): they exchange tokens with all-to-all."""
        return [g[i : i + self.ep] for g in self.dp_groups() for i in range(0, self.dp, self.ep)]

    def edp_groups(self) -> list[list[int]]:
        """The dp ranks holding the same experts (same place in their ep group): dp/ep of them."""
        return [g[i :: self.ep] for g in self.dp_groups() for i in range(self.ep)]

    def pp_groups(self) -> list[list[int]]:
        return self.grid().permute(1, 2, 3, 0).reshape(-1, self.pp).tolist()

    def embedding_groups(self) -> list[list[int]]:
        """First and last stage of each pipeline: they hold the two copies of tied embeddings."""
        return [sorted({g[0], g[-1]}) for g in self.pp_groups()]

    def tp_block_groups(self, block: int) -> list[list[int]]:
        """Each tp group cut into runs of `block` consecutive ranks (kv-head replicas under GQA)."""
        return [g[i : i + block] for g in self.tp_groups() for i in range(0, self.tp, block)]


def resolve_layout(world: int, tp: int = 1, pp: int = 1, dp: int | None = None, cp: int = 1, ep: int = 1) -> Layout:
    """Check the sizes against the world and derive dp; one clear sentence on any mismatch.

    Pure arithmetic, so every rank raises the same error before any collective is issued.
    """
    for name, value in (("world size", world), ("tp", tp), ("pp", pp), ("cp", cp), ("ep", ep)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be a whole number >= 1, got {value!r}")
    if dp is not None and (not isinstance(dp, int) or dp < 1):
        raise UserError(f"dp must be a whole number >= 1 or left unset, got {dp!r}")
    if world % (tp * cp * pp) != 0:
        names, values, which = (
            ("tp*pp", f"{tp}*{pp}", "tp and pp") if cp == 1 else ("tp*cp*pp", f"{tp}*{cp}*{pp}", "tp, cp and pp")
        )
        raise UserError(
            f"world size {world} is not divisible by {names} = {values} = {tp * cp * pp}; "
            f"choose {which} whose product divides {world}"
        )
    derived = world // (tp * cp * pp)
    if dp is not None and dp != derived:
        cp_part = f" * cp={cp}" if cp > 1 else ""
        raise UserError(
            f"dp={dp} disagrees with world size {world} / (tp={tp}{cp_part} * pp={pp}) = {derived}; "
            f"use dp={derived} or leave dp unset"
        )
    if derived % ep != 0:
        raise UserError(
            f"ep={ep} does not divide dp={derived}: expert parallelism is carved out of the data-parallel "
            f"ranks; choose an ep that divides {derived}"
        )
    if ep > 1 and cp > 1:
        raise UserError(f"ep={ep} cannot be combined with cp={cp} yet; set ep=1 or cp=1")
    return Layout(tp=tp, pp=pp, dp=derived, cp=cp, ep=ep)


def backend_for(device: torch.device | str) -> str:
    """NCCL for CUDA tensors, gloo for everything else."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


@dataclass
class Topology:
    """This process's place in the layout, and the process groups it belongs to.

    Groups are ``None`` in a process that never initialised torch.distributed
    (`Topology.single()`), where every collective helper treats ``None`` as a group of
    one; and `embedding_group` is ``None`` on the middle stages of a pipeline (pp >= 3).
    """

    layout: Layout
    rank: int
    device: torch.device
    tp_group: dist.ProcessGroup | None = None
    cp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    # dp x cp: the ranks holding the same weights (the dp group itself when cp = 1)
    dp_cp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    # expert parallelism: the token all-to-all (None at ep = 1), and the expert parameters'
    # data-parallel group (the dp group at ep = 1; None when ep = dp: each holds its own)
    ep_group: dist.ProcessGroup | None = None
    edp_group: dist.ProcessGroup | None = None
    embedding_group: dist.ProcessGroup | None = None
    # tp sub-groups by block size: the ranks that share one replicated kv head
    tp_block_groups: dict[int, dist.ProcessGroup | None] = field(default_factory=dict)
    # the rendezvous store (this attempt's key space), for the stall watchdog; None when
    # the process group was made elsewhere (`from_initialized`) or there is none
    store: dist.Store | None = None
    heartbeat: Heartbeat = field(default_factory=Heartbeat)  # this rank's current phase

    # --- coordinates -------------------------------------------------------------------
    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def pp(self) -> int:
        return self.layout.pp

    @property
    def dp(self) -> int:
        return self.layout.dp

    @property
    def cp(self) -> int:
        return self.layout.cp

    @property
    def ep(self) -> int:
        return self.layout.ep

    @property
    def edp(self) -> int:
        """Ranks that hold the same experts: the expert parameters' gradient reduction and ZeRO shards."""
        return self.layout.dp // self.layout.ep

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.layout.ep

    @property
    def edp_rank(self) -> int:
        return self.dp_rank // self.layout.ep

    @property
    def dp_cp(self) -> int:
        """Ranks that hold the same weights: the size of the gradient reduction and of ZeRO's shards."""
        return self.layout.dp * self.layout.cp

    @property
    def world(self) -> int:
        return self.layout.world

    @property
    def pp_rank(self) -> int:
        return self.layout.coords(self.rank)[0]

    @property
    def dp_rank(self) -> int:
        return self.layout.coords(self.rank)[1]

    @property
    def tp_rank(self) -> int:
        return self.layout.coords(self.rank)[2]

    @property
    def cp_rank(self) -> int:
        return self.layout.cp_of(self.rank)

    @property
    def dp_cp_rank(self) -> int:
        """This rank's place in `dp_cp_group` (dp-major, as the group lists its ranks)."""
        return self.dp_rank * self.cp + self.cp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def pp_prev_rank(self) -> int | None:
        """Global rank of the previous pipeline stage (same dp and tp coordinates)."""
        if self.is_first_stage:
            return None
        return self.layout.rank_of(self.pp_rank - 1, self.dp_rank, self.tp_rank, self.cp_rank)

    @property
    def pp_next_rank(self) -> int | None:
        if self.is_last_stage:
            return None
        return self.layout.rank_of(self.pp_rank + 1, self.dp_rank, self.tp_rank, self.cp_rank)

    @property
    def pp_last_rank(self) -> int:
        """Global rank of the last stage of this rank's pipeline (it computes the loss)."""
        return self.layout.rank_of(self.pp - 1, self.dp_rank, self.tp_rank, self.cp_rank)

    def tp_block_group(self, block: int) -> dist.ProcessGroup | None:
        """The group of `block` consecutive tp ranks containing this rank."""
        if block == 1 or self.tp_group is None:
            return None
        if block == self.tp:
            return self.tp_group
        if block not in self.tp_block_groups:
            raise UserError(f"no tp sub-group of size {block}; sizes that divide tp={self.tp} are valid")
        return self.tp_block_groups[block]

    # --- construction ------------------------------------------------------------------
    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> "Topology":
        """A one-process layout with no process groups (the reference for every test)."""
        return cls(layout=Layout(1, 1, 1), rank=0, device=torch.device(device))

    @classmethod
    def from_env(
        cls,
        tp: int = 1,
        pp: int = 1,
        dp: int | None = None,
        cp: int = 1,
        device: str = "cpu",
        timeout_s: float = 600.0,
        ep: int = 1,
    ) -> "Topology":
        """Join the job described by torchrun's environment and build every group.

        All size checks run first, on every rank, so a bad layout raises the same
        sentence everywhere instead of leaving some ranks waiting in a collective.
        """
        missing = [k for k in ENV_KEYS if k not in os.environ]
        if missing:
            raise UserError(
                f"missing launcher environment variables {missing}; start trident under torchrun "
                f"(or use --nproc N to let it launch local ranks)"
            )
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        layout = resolve_layout(world, tp, pp, dp, cp, ep)
        dev = torch.device(device)
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(dev)
        prefixed = None
        if not dist.is_initialized():
            timeout = datetime.timedelta(seconds=timeout_s)
            store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
            # Under torchrun's restarts (--max-restarts) every attempt talks to the agent's
            # same store; keys left by the killed attempt would send a rank to a dead
            # peer's address, so each attempt gets its own key space.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            prefixed = dist.PrefixStore(f"trident/attempt_{attempt}", store)
            dist.init_process_group(
                backend=backend_for(dev),
                store=prefixed,
                rank=rank,
                world_size=world,
                timeout=timeout,
            )
        topo = cls._with_groups(layout, dev, timeout_s)
        topo.store = prefixed
        return topo

    @classmethod
    def from_initialized(
        cls, tp: int = 1, pp: int = 1, dp: int | None = None, device: str = "cpu", timeout_s: float = 600.0,
        cp: int = 1, ep: int = 1,
    ) -> "Topology":
        """Build the groups on an already initialised default process group (tests, notebooks)."""
        layout = resolve_layout(dist.get_world_size(), tp, pp, dp, cp, ep)
        return cls._with_groups(layout, torch.device(device), timeout_s)

    @classmethod
    def _with_groups(cls, layout: Layout, device: torch.device, timeout_s: float) -> "Topology":
        rank = dist.get_rank()
        timeout = datetime.timedelta(seconds=timeout_s)

        def mine(all_groups: list[list[int]], required: bool = True) -> dist.ProcessGroup | None:
            # new_group is collective over the whole world: every rank creates every
            # group, in the same order, and keeps the one that contains it.
            found = None
            for ranks in all_groups:
                group = dist.new_group(ranks, timeout=timeout)
                if rank in ranks:
                    found = group
            assert found is not None or not required
            return found

        topo = cls(layout=layout, rank=rank, device=device)
        topo.tp_group = mine(layout.tp_groups())
        topo.dp_group = mine(layout.dp_groups())
        topo.cp_group = mine(layout.cp_groups()) if layout.cp > 1 else None
        topo.dp_cp_group = mine(layout.dp_cp_groups()) if layout.cp > 1 else topo.dp_group
        topo.pp_group = mine(layout.pp_groups())
        topo.edp_group = topo.dp_group  # ep = 1: every dp rank holds every expert
        if layout.ep > 1:
            topo.ep_group = mine(layout.ep_groups())
            topo.edp_group = mine(layout.edp_groups()) if layout.ep < layout.dp else None
        # middle pipeline stages (pp >= 3) hold no embedding copy and belong to no such group
        topo.embedding_group = mine(layout.embedding_groups(), required=False)
        for block in range(2, layout.tp):
            if layout.tp % block == 0:
                topo.tp_block_groups[block] = mine(layout.tp_block_groups(block))
        return topo

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world} (tp {self.tp_rank}/{self.tp}, "
            + (f"cp {self.cp_rank}/{self.cp}, " if self.cp > 1 else "")
            + f"pp {self.pp_rank}/{self.pp}, dp {self.dp_rank}/{self.dp}"
            + (f", ep {self.ep_rank}/{self.ep}" if self.ep > 1 else "") + f") on {self.device}"
        )


def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)
