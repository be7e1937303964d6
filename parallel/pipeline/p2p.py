"""Point-to-point transfers between neighbouring pipeline stages.

Activations travel forward (stage r -> r+1) and their gradients backward (r+1 -> r).
Both ends know every tensor's shape and dtype from the config (`activation_shape`), so
nothing but the data itself crosses the wire: no shape handshake, no extra latency per
transfer, and a shape mismatch is a config error caught before the first step.

All operations of one `exchange` are posted together with ``batch_isend_irecv`` and
waited on together, which is what lets a stage send its activation to the next stage and
receive a gradient from it in one round trip (Megatron's ``send_forward_recv_backward``)
without either side having to go first. An exchange posted with ``wait=False`` stays in
flight while the rank computes (a zero-bubble schedule sends an input gradient upstream
and computes weight gradients meanwhile); the next waiting exchange waits for it too.
Which exchanges happen in what order is the schedule's business
(`trident.parallel.pipeline.schedule.plan`); this module only moves tensors.

Operations are posted in one fixed order on every rank: activations (send to the next,
receive from the previous), then gradients (send to the previous, receive from the
next). With virtual stages the pipeline is a ring (the last rank feeds chunk c+1 of the
first), and at pp = 2 the previous and the next rank are the same rank: NCCL pairs the
operations of a rank pair in posting order (it has no tags), so both ends must post them
in the same order, which this one does (the schedule simulator checks it per rank pair).

Works on gloo (CPU tensors) and NCCL (CUDA tensors on the topology's device). Peers are
global ranks taken from the topology, so tp and dp replicas of a stage each talk to
their own counterpart in the neighbouring stage.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from trident.errors import UserError
from trident.parallel.context.sharding import check_cp
from trident.parallel.pipeline.schedule import Exchange
from trident.parallel.topology import Topology


def activation_shape(
    micro_batch_size: int, seq_len: int, hidden: int, tp: int = 1, sequence_parallel: bool = False, cp: int = 1
) -> tuple[int, int, int]:
    """Shape of the hidden state between stages: [b, s/cp, hidden] (a context-parallel
    rank holds s/cp tokens of each sample), or [b, s/cp/tp, hidden] when sequence
    parallelism shards that further (each tp rank sends its own shard)."""
    check_cp(seq_len, cp)
    seq_len //= cp
    if sequence_parallel and tp > 1:
        if seq_len % tp != 0:
            raise UserError(f"sequence length {seq_len} is not divisible by tp={tp} (sequence parallelism)")
        seq_len //= tp
    return (micro_batch_size, seq_len, hidden)


class PeerExchange(NamedTuple):
    """An exchange as a heartbeat phase detail, formatted only when published:
    'send act 0 to rank 1 + recv grad 0 from rank 1'."""

    action: Exchange
    prev: int | None
    next: int | None

    def __str__(self) -> str:
        peer = {"prev": self.prev, "next": self.next}
        return " + ".join(f"{t} {'to' if t.op == 'send' else 'from'} rank {peer[t.peer]}"
                          for t in self.action.transfers) or "wait"


class StageComm:
    """This rank's links to the previous and next stage of its pipeline.

    `shape` and `dtype` describe every tensor in both directions (an activation and its
    gradient have the same shape). `ring` (virtual stages) links the last rank to the first.
    """

    def __init__(
        self,
        topo: Topology,
        shape: tuple[int, ...],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        ring: bool = False,
    ) -> None:
        self.prev, self.next = topo.pp_prev_rank, topo.pp_next_rank
        if ring and topo.pp > 1:
            p, rank_of = topo.pp, topo.layout.rank_of
            self.prev = rank_of((topo.pp_rank - 1) % p, topo.dp_rank, topo.tp_rank, topo.cp_rank)
            self.next = rank_of((topo.pp_rank + 1) % p, topo.dp_rank, topo.tp_rank, topo.cp_rank)
        self.in_flight: list[dist.Work] = []  # posted without waiting; waited by the next exchange
        self.in_flight_tensors: list[torch.Tensor] = []  # kept alive until then
        self.group = topo.pp_group
        self.shape, self.dtype = tuple(shape), dtype
        self.device = torch.device(device) if device is not None else topo.device
        self.sends = self.recvs = 0  # operations issued, for tests and logs
        if topo.pp > 1 and self.device.type == "cuda" and dist.get_backend(self.group) == "nccl":
            # NCCL needs every rank of a group in that group's first operation before a
            # batch_isend_irecv may involve only some of them (torch's documented rule);
            # a one-element all-reduce here makes the pipeline's first transfer safe.
            dist.all_reduce(torch.zeros(1, device=self.device), group=self.group)

    def _check(self, t: torch.Tensor, to: str) -> torch.Tensor:
        if tuple(t.shape) != self.shape or t.dtype != self.dtype:
            raise ValueError(
                f"sending a {tuple(t.shape)} {t.dtype} tensor to the {to} stage, but the config says "
                f"{self.shape} {self.dtype}; every stage must agree on the activation shape"
            )
        return t.detach().contiguous()

    def exchange(
        self,
        send_prev: torch.Tensor | None = None,
        send_next: torch.Tensor | None = None,
        recv_prev: bool = False,
        recv_next: bool = False,
        wait: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Post the requested sends and receives as one batch and, with `wait`, wait for
        them and for every batch posted before without waiting; return (tensor from the
        previous stage, tensor from the next stage), None where nothing was received.
        Without `wait`, received tensors must not be read before a later waiting exchange."""
        ops: list[dist.P2POp] = []
        from_prev = from_next = None
        if (send_prev is not None or recv_prev) and self.prev is None:
            raise ValueError("the first stage has no previous stage to exchange with")
        if (send_next is not None or recv_next) and self.next is None:
            raise ValueError("the last stage has no next stage to exchange with")
        # the fixed order of the module docstring: activations, then gradients
        if send_next is not None:
            ops.append(dist.P2POp(dist.isend, self._check(send_next, "next"), self.next, self.group))
        if recv_prev:
            from_prev = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, from_prev, self.prev, self.group))
        if send_prev is not None:
            ops.append(dist.P2POp(dist.isend, self._check(send_prev, "previous"), self.prev, self.group))
        if recv_next:
            from_next = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, from_next, self.next, self.group))
        works = dist.batch_isend_irecv(ops) if ops else []
        self.sends += (send_prev is not None) + (send_next is not None)
        self.recvs += recv_prev + recv_next
        if not wait:
            self.in_flight += works
            self.in_flight_tensors += [op.tensor for op in ops]
            return from_prev, from_next
        self.wait_all(works)
        return from_prev, from_next

    def wait_all(self, works: list | None = None) -> None:
        """Wait for `works` and for everything posted without waiting."""
        pending = self.in_flight + list(works or [])
        self.in_flight, self.in_flight_tensors = [], []
        for req in pending:
            req.wait()
        if pending and self.device.type == "cuda":
            # received buffers are written on NCCL's stream; Megatron synchronises here too
            torch.cuda.synchronize(self.device)
