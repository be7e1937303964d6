"""Where a stored optimizer-state entry's values lie, in a rank's flat shard and in the
global tensor.

The optimizer saves its state by global tensor name: an entry is the part of one
parameter piece (`Piece`) that one rank's flat ZeRO range covers. This module is the
geometry behind saving and resharded loading — which elements an entry holds, as a few
strided views (never per-element indices), and where two entries saved at different
(tp, pp, dp, zero) layouts overlap — so the optimizer itself only moves values.
"""

from __future__ import annotations

import math

import torch

from trident.errors import UserError
from trident.parallel.tensor.sharding import Piece

KINDS = ("master", "exp_avg", "exp_avg_sq")
"""The stored state tensors of each entry, in file order."""


# --- where an entry's values lie ------------------------------------------------------------
# A piece is a block of a tensor seen as [outer, size, inner] around the piece's dim: rows
# of `length * inner` contiguous elements, one per outer index, `size * inner` apart. The
# elements of a contiguous flat range of the local parameter that fall in the piece are
# a contiguous range [p0, p1) of the block's elements (row-major), and the same range of
# the piece's block in the global tensor. So an entry is a few runs of whole or partial
# rows on either side: views and copies, never per-element indices.
def _split(shape: tuple[int, ...] | list[int], dim: int) -> tuple[int, int, int]:
    """(outer, size, inner): `shape` seen as [outer, size, inner] around `dim`."""
    return math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1 :])


def piece_range(local_shape: tuple[int, ...], piece: Piece, a: int, z: int) -> tuple[int, int]:
    """The range [p0, p1) of the piece's elements (its block, row-major) that a local
    parameter's flat elements [a, z) hold."""
    _, size, inner = _split(local_shape, piece.dim)
    row, stride, lo = piece.length * inner, size * inner, piece.local_start * inner

    def before(f: int) -> int:  # how many of the piece's elements lie at local flat positions < f
        o, r = divmod(f, stride)
        return o * row + min(max(r - lo, 0), row)

    return before(a), before(z)


def _entry_range(entry: dict) -> tuple[int, int]:
    """`piece_range` of a state entry (its metadata)."""
    p = entry["piece"]
    piece = Piece(entry["global_name"], tuple(entry["global_shape"]), p["dim"], p["start"], p["length"], p["local_start"])
    return piece_range(tuple(entry["local_shape"]), piece, *entry["local_range"])


def span(entry: dict) -> tuple:
    """Which elements of which global tensor an entry holds, in a comparable form."""
    p = entry["piece"]
    return (entry["global_name"], p["dim"], p["start"], p["length"], *_entry_range(entry))


def block_runs(flat: torch.Tensor, base: int, stride: int, row: int, p0: int, p1: int) -> list[torch.Tensor]:
    """Views of 1-D `flat` holding elements [p0, p1) of a block whose row o (of `row`
    elements) starts at ``flat[base + o * stride]``; at most four, in order. Where the
    range is cut depends on (row, p0, p1) alone, so the runs of the same range in two
    tensors (local and global) have the same shapes, pair by pair."""
    views, q = [], p0
    o, r = divmod(q, row)
    if r:  # the rest of a partly covered first row
        n = min(p1 - q, row - r)
        views.append(flat[base + o * stride + r : base + o * stride + r + n])
        q, o = q + n, o + 1
    whole = (p1 - q) // row
    if whole > 1:  # all whole rows but the last as one 2-D view (`flat` may end right after the last)
        at = base + o * stride
        views.append(flat[at : at + (whole - 1) * stride].view(whole - 1, stride)[:, :row])
        q, o = q + (whole - 1) * row, o + whole - 1
    while q < p1:  # the last whole row, then a partly covered last row
        n = min(p1 - q, row)
        views.append(flat[base + o * stride : base + o * stride + n])
        q, o = q + n, o + 1
    return views


def entry_runs(entry: dict, flat: torch.Tensor, local: bool = False) -> list[torch.Tensor]:
    """Views of `flat` that hold a state entry's values, in stored order: of the whole
    flattened global tensor, or (`local`) of the parameter's flat elements in the
    entry's ``local_range`` (what the saving rank owned)."""
    p = entry["piece"]
    a = entry["local_range"][0]
    _, size, inner = _split(entry["local_shape"], p["dim"])
    p0, p1 = _entry_range(entry)
    row = p["length"] * inner
    if local:
        return block_runs(flat, p["local_start"] * inner - a, size * inner, row, p0, p1)
    _, global_size, global_inner = _split(entry["global_shape"], p["dim"])
    if global_inner != inner:
        raise UserError(f"optimizer entry {entry['key']!r}: local shape {entry['local_shape']} and global shape "
                        f"{entry['global_shape']} differ beyond dim {p['dim']}")
    return block_runs(flat, p["start"] * inner, global_size * inner, row, p0, p1)


def gather_runs(runs: list[torch.Tensor], count: int) -> torch.Tensor:
    """The runs' values, concatenated into a new fp32 CPU tensor."""
    out = torch.empty(count, dtype=torch.float32)
    at = 0
    for r in runs:
        out[at : at + r.numel()].view(r.shape).copy_(r)
        at += r.numel()
    assert at == count, (at, count)
    return out


def scatter_values(values: torch.Tensor, runs: list[torch.Tensor]) -> None:
    """Copy a stored entry's values into the runs that hold it."""
    values = values.reshape(-1)
    at = 0
    for r in runs:
        r.copy_(values[at : at + r.numel()].view(r.shape))
        at += r.numel()
    if at != values.numel():
        raise UserError(f"an optimizer entry stores {values.numel()} values where its metadata says {at}")


def assemble(sources: list[tuple[dict, dict]], numel: int) -> list[torch.Tensor]:
    """One global tensor, flat, for each kind, from every saved entry of it; and last a
    bool tensor of the elements some entry covered."""
    full = [torch.zeros(numel, dtype=torch.float32) for _ in KINDS] + [torch.zeros(numel, dtype=torch.bool)]
    for meta, tensors in sources:
        for k, kind in enumerate(KINDS):
            scatter_values(read_values(tensors, f"{kind}/{meta['key']}"), entry_runs(meta, full[k]))
        for r in entry_runs(meta, full[-1]):
            r.fill_(True)
    return full


def read_values(tensors: object, name: str, lo: int = 0, hi: int | None = None) -> torch.Tensor:
    """Stored values [lo, hi) of `name`, from a dict of tensors or from an open safetensors
    file, whose lazy ``get_slice`` reads only that range."""
    if hasattr(tensors, "get_slice"):
        # a whole entry through get_tensor: the plain read, faster than a full slice
        return tensors.get_tensor(name) if lo == 0 and hi is None else tensors.get_slice(name)[lo:hi]
    return tensors[name].reshape(-1)[lo:hi]


def _first_last(entry: dict) -> tuple[int, int]:
    """Flat indices in the global tensor of an entry's first and last stored value."""
    p = entry["piece"]
    _, size, inner = _split(entry["global_shape"], p["dim"])
    p0, p1 = _entry_range(entry)
    row = p["length"] * inner

    def at(q: int) -> int:
        o, r = divmod(q, row)
        return o * size * inner + p["start"] * inner + r

    return at(p0), at(p1 - 1)


def overlap(want: dict, have: dict) -> tuple[int, ...] | None:
    """Where the values of local entry `want` that saved entry `have` also holds lie, or None
    when there are none. Both are sliced along the same dim of the same global tensor.

    An entry holds exactly the elements of its piece's block whose global flat index lies
    between those of its first and last value (row-major order keeps the block's order).
    So the overlap is the elements of the intersected piece (rows of ``row`` elements)
    between the later first and the earlier last value: the block range [q0, q1) of that
    piece, which `block_runs` finds in the local state (``local_base``, ``local_stride``) and in
    the saved entry's stored values (``stored_base``, ``stored_stride``) alike. Returns
    (q0, q1, row, local_base, local_stride, stored_base, stored_stride)."""
    pw, ph = want["piece"], have["piece"]
    dim = pw["dim"]
    inner = _split(want["global_shape"], dim)[2]
    _, local_size, local_inner = _split(want["local_shape"], dim)
    for entry, entry_inner in ((want, local_inner), (have, _split(have["local_shape"], dim)[2])):
        if entry_inner != inner:
            raise UserError(f"optimizer entry {entry['key']!r}: local shape {entry['local_shape']} and global shape "
                            f"{entry['global_shape']} differ beyond dim {dim}")
    start, end = max(pw["start"], ph["start"]), min(pw["start"] + pw["length"], ph["start"] + ph["length"])
    if start >= end:
        return None
    (w0, w1), (h0, h1) = _first_last(want), _first_last(have)
    g0, g1 = max(w0, h0), min(w1, h1)
    if g0 > g1:
        return None
    piece = Piece(want["global_name"], tuple(want["global_shape"]), dim, start, end - start, start)
    q0, q1 = piece_range(tuple(want["global_shape"]), piece, g0, g1 + 1)
    if q0 == q1:
        return None
    p0_have = _entry_range(have)[0]
    return (q0, q1, (end - start) * inner,
            (pw["local_start"] + start - pw["start"]) * inner - want["local_range"][0], local_size * inner,
            (start - ph["start"]) * inner - p0_have, ph["length"] * inner)


def piece_elements(local_shape: tuple[int, ...], piece: Piece, a: int, z: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Of a local parameter's flat elements [a, z): the positions (relative to a) that
    belong to `piece`, and their flat indices in the piece's global tensor (per-element
    indices for tests and tools; saving and loading use `entry_runs`)."""
    p0, p1 = piece_range(local_shape, piece, a, z)
    _, size, inner = _split(local_shape, piece.dim)
    _, global_size, _ = _split(piece.global_shape, piece.dim)
    q = torch.arange(p0, p1, dtype=torch.long)
    o, r = q // (piece.length * inner), q % (piece.length * inner)
    local = o * (size * inner) + piece.local_start * inner + r - a
    return local, o * (global_size * inner) + piece.start * inner + r


def global_indices(entry: dict) -> torch.Tensor:
    """Flat indices into ``entry["global_name"]`` of the values stored for `entry`."""
    p = entry["piece"]
    piece = Piece(entry["global_name"], tuple(entry["global_shape"]), p["dim"], p["start"], p["length"],
                  p["local_start"], replicas=p["replicas"])
    a, z = entry["local_range"]
    return piece_elements(tuple(entry["local_shape"]), piece, a, z)[1]
