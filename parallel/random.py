"""Named random streams for dropout, so masks agree where they must and differ where they must.

* ``replicated``: the same on every tp rank of a model replica. Dropout on a full hidden
  state that every tp rank holds (after a row-parallel linear, without sequence
  parallelism) must drop the same elements everywhere, or the replicas drift apart.
* ``tp``: different on every tp rank. Dropout on sharded data (attention probabilities of
  this rank's heads, or a sequence shard under sequence parallelism) must not repeat the
  same mask on every shard.

Both streams differ across pipeline stages and data-parallel ranks. `fork` swaps a stream
into the device's default generator (so F.dropout and SDPA's dropout use it) and saves
its advanced state on exit; `state_dict` / `load_state_dict` carry the streams through a
checkpoint and let activation recomputation replay them.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

import torch

from trident.parallel.topology import Topology

REPLICATED = "replicated"
TP = "tp"


def _derive(seed: int, *parts: object) -> int:
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _get_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class RNGStreams:
    """The named generator states of one rank, seeded from the run seed and its coordinates."""

    def __init__(self, seed: int, topo: Topology) -> None:
        self.device = topo.device
        self.states: dict[str, torch.Tensor] = {}
        # cp ranks hold different tokens: their own streams (cp = 1 derives as it always has)
        where = (topo.pp_rank, topo.dp_rank) + ((topo.cp_rank,) if topo.cp > 1 else ())
        seeds = {
            REPLICATED: _derive(seed, "replicated", *where),
            TP: _derive(seed, "tp", *where, topo.tp_rank),
        }
        saved = _get_state(self.device)
        for name, s in seeds.items():
            if self.device.type == "cuda":
                torch.cuda.manual_seed(s)
            else:
                torch.manual_seed(s)
            self.states[name] = _get_state(self.device).clone()
        _set_state(self.device, saved)

    @contextlib.contextmanager
    def fork(self, name: str) -> Iterator[None]:
        """Run the body with stream `name` as the default generator, then put it back."""
        outer = _get_state(self.device)
        _set_state(self.device, self.states[name])
        try:
            yield
        finally:
            self.states[name] = _get_state(self.device).clone()
            _set_state(self.device, outer)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states.items()}

    def load_state_dict(self, states: dict[str, torch.Tensor]) -> None:
        missing = set(self.states) - set(states)
        if missing:
            raise KeyError(f"RNG stream states missing: {sorted(missing)}")
        self.states = {name: states[name].clone() for name in self.states}
