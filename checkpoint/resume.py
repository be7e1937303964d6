"""Choosing the checkpoint a job resumes from, every rank verifying only what it will read.

Verifying on rank 0 alone (sha256 of every file while the others wait in a collective)
takes ~17 minutes for the ~1 TB of a 70B run's optimizer state at 1 GB/s: past the
collective timeout, so a big job could never resume. Here each rank hashes its share --
the files it reads to load (its model slices' files, the optimizer files the index
picks, its own RNG file), with the files every replica of its (tp, pp) position reads
alike (model files; the optimizer's at zero 0) split among that replica group, so each
is hashed once per group that reads it; nothing a rank does not read is hashed. The
verdicts are combined with one all-reduce on a gloo group whose timeout is set from the
largest share (every rank learns its size first, from ``stat``), and the first failing
rank's sentence, naming the file, is broadcast so every rank reports the same reason. A
checkpoint that fails is passed over for the next newest, as before.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch import nn

from trident.checkpoint.checkpoint import model_reads, optimizer_reads
from trident.checkpoint.index import read_index
from trident.checkpoint.state import RunState, read_state
from trident.checkpoint.store import LATEST, complete_checkpoints, sha256_file, step_dir_name, step_of
from trident.errors import UserError
from trident.parallel.collectives import comm_device
from trident.parallel.topology import Topology

MIN_READ_RATE = 25e6  # bytes/s: a slow shared file system under a whole job's load
MESSAGE_BYTES = 2048


def candidates(root: Path) -> list[Path]:
    """Complete checkpoints in the order to try: the one `latest` names, then newest first."""
    found = complete_checkpoints(root)
    named = None
    try:
        named = root / json.loads((root / LATEST).read_text())["dir"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        pass
    return ([named] if named in found else []) + [c for c in reversed(found) if c != named]


def share(ckpt: Path, topo: Topology, model: nn.Module, optimizer: Any) -> tuple[RunState, list[str]]:
    """The checkpoint's state and the files this rank verifies: those it reads, the ones its
    whole dp x cp replica group reads alike dealt out among the group."""
    state = read_state(ckpt)
    index = read_index(ckpt, state.files)  # verified here from the bytes it parses
    group_wide = {path.name for *_, path, _, _, _ in model_reads(ckpt, model, index)}
    own = {p.name for p in optimizer_reads(ckpt, optimizer, index)}
    if optimizer.cfg.zero == 0:  # every replica owns the whole state: they read the same files
        group_wide |= own
        own = set()
    lay = state.layout
    if (lay.tp, lay.pp, lay.dp, lay.world) == (topo.tp, topo.pp, topo.dp, topo.world):  # else not restored
        own.add(f"rng_rank{topo.rank}.safetensors")
    mine = [n for i, n in enumerate(sorted(group_wide)) if i % topo.dp_cp == topo.dp_cp_rank]
    return state, sorted(own | set(mine))


def check(ckpt: Path, state: RunState, names: list[str]) -> str | None:
    """None if every named file matches its recorded sha256, else one sentence naming the file."""
    for name in names:
        path = ckpt / name
        if name not in state.files:
            return f"checkpoint file {str(path)!r} is not recorded in its meta.json"
        try:
            found, recorded = sha256_file(path), state.files[name]
        except FileNotFoundError:
            return f"checkpoint file {str(path)!r} is missing"
        except OSError as err:
            return f"checkpoint file {str(path)!r} cannot be read ({err.strerror})"
        if found != recorded:
            return f"checkpoint file {str(path)!r} fails its sha256 check (recorded {recorded[:12]}..., found {found[:12]}...)"
    return None


def verify_share(ckpt: Path, topo: Topology, model: nn.Module, optimizer: Any) -> tuple[list[str], str | None]:
    """(files this rank verified, the sentence naming the first bad file on any rank, or
    None). Collective; a bad file never raises here, so every rank reaches each collective."""
    state, names, failure = None, [], None
    try:
        state, names = share(ckpt, topo, model, optimizer)
    except (UserError, OSError, SafetensorError, KeyError, ValueError) as err:
        failure = str(err)
    nbytes = sum((ckpt / n).stat().st_size for n in names if (ckpt / n).is_file())
    group = _verify_group(nbytes, topo)
    if failure is None and state is not None:
        failure = check(ckpt, state, names)
    return names, combine(failure, topo, group)


def _verify_group(nbytes: int, topo: Topology) -> dist.ProcessGroup | None:
    """Every rank learns the largest share (all-reduce MAX of its bytes, known from ``stat``
    before any hashing) and joins a gloo group whose timeout covers hashing that share at
    `MIN_READ_RATE`: the verdicts wait on it, not under the job's collective timeout."""
    if topo.world == 1:
        return None
    t = torch.tensor([float(nbytes)], dtype=torch.float64, device=comm_device(topo))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    seconds = 600 + float(t.item()) / MIN_READ_RATE
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=seconds))


def combine(failure: str | None, topo: Topology, group: dist.ProcessGroup | None) -> str | None:
    """The first failing rank's sentence on every rank (None when every rank's share passed)."""
    if topo.world == 1:
        return failure
    try:
        first = torch.tensor([topo.rank if failure is not None else topo.world], dtype=torch.int64)
        dist.all_reduce(first, op=dist.ReduceOp.MIN, group=group)  # waits for the slowest hasher
        src = int(first.item())
        if src == topo.world:
            return None
        msg = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8)
        if topo.rank == src:
            raw = (failure or "").encode()[:MESSAGE_BYTES]
            msg[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        dist.broadcast(msg, src=src, group=group)
        return bytes(msg[msg != 0].tolist()).decode(errors="replace") + f" (found by rank {src})"
    finally:
        dist.destroy_process_group(group)


def choose_checkpoint(
    root: str | Path, topo: Topology, model: nn.Module, optimizer: Any, log: Callable[[str], None] = print
) -> Path | None:
    """The newest checkpoint under `root` (``latest`` first) whose files all pass their
    checksums, each rank hashing its share; None when there is none. Collective."""
    for ckpt in _agreed_order(Path(root), topo):
        _, failure = verify_share(ckpt, topo, model, optimizer)
        if failure is None:
            return ckpt
        log(f"checkpoint {ckpt.name} is unusable: {failure}; falling back to an earlier one")
    return None


def _agreed_order(root: Path, topo: Topology) -> list[Path]:
    """Rank 0's list of candidates, broadcast: every rank tries the same ones in the same
    order even if a shared file system shows the folder differently on another node."""
    steps = [step_of(c) for c in candidates(root)] if topo.rank == 0 else []
    if topo.world > 1:
        dev = comm_device(topo)
        n = torch.tensor([len(steps)], dtype=torch.int64, device=dev)
        dist.broadcast(n, src=0)
        t = torch.tensor(steps + [0] * (int(n.item()) - len(steps)), dtype=torch.int64, device=dev)
        if len(t) > 0:
            dist.broadcast(t, src=0)
        steps = [int(s) for s in t.tolist()]
    return [root / step_dir_name(s) for s in steps]
