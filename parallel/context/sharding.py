"""Which tokens of a sequence each context-parallel rank holds.

Causal attention makes a token's work grow with its position: cut the sequence into
``cp`` contiguous pieces and the last rank would do ``2·cp - 1`` times the first rank's
attention. Megatron-Core's load balancing cuts it into ``2·cp`` chunks instead and gives
rank ``i`` chunks ``i`` and ``2·cp - 1 - i`` (one early, one late), so every rank does the
same work. Every rank can compute every rank's index from ``(seq_len, cp)`` alone, which
the ring attention uses to mask a block that arrives from another rank.
"""

from __future__ import annotations

import torch

from trident.errors import UserError


def check_cp(seq_len: int, cp: int) -> None:
    """One sentence when `seq_len` cannot be cut into ``2·cp`` equal chunks."""
    if not isinstance(cp, int) or cp < 1:
        raise UserError(f"cp must be a whole number >= 1, got {cp!r}")
    if cp > 1 and seq_len % (2 * cp) != 0:
        raise UserError(
            f"sequence length {seq_len} is not divisible by 2*cp = {2 * cp} (context parallelism cuts each "
            f"sequence into 2*cp load-balanced chunks); choose a seq_len that is a multiple of {2 * cp}"
        )


def load_balanced_index(seq_len: int, cp: int) -> torch.Tensor:
    """Global positions of every cp rank's tokens: ``[cp, seq_len / cp]`` int64, row ``i``
    holding chunks ``i`` and ``2·cp - 1 - i`` of the ``2·cp`` equal chunks, in order."""
    check_cp(seq_len, cp)
    chunks = torch.arange(seq_len).view(2 * cp, seq_len // (2 * cp))  # [2cp, chunk]
    ranks = torch.arange(cp)
    return torch.cat([chunks[ranks], chunks[2 * cp - 1 - ranks]], dim=1)  # [cp, s/cp]


def shard_sequence(t: torch.Tensor, cp: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """This cp rank's tokens of `t` along `dim` (the sequence), in `load_balanced_index` order."""
    # t: [..., s, ...]  ->  [..., s/cp, ...]
    if cp == 1:
        return t
    index = load_balanced_index(t.shape[dim], cp)[cp_rank].to(t.device)
    return t.index_select(dim, index)


def shard_microbatch(mb: dict[str, torch.Tensor], cp: int, cp_rank: int) -> dict[str, torch.Tensor]:
    """This cp rank's part of a microbatch of ``[b, s]`` tensors: tokens, labels and the loss
    mask cut to its ``s/cp`` tokens; ``doc_ids`` kept whole, because the positions of this
    rank's tokens (reset per document) and the document mask of every K/V block that the
    ring brings from another rank are read from the whole sequence's documents."""
    if cp == 1:
        return mb
    return {k: (v if k == "doc_ids" else shard_sequence(v, cp, cp_rank)) for k, v in mb.items()}
