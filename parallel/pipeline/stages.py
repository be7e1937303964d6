"""Which transformer layers each pipeline stage holds, and the checks on pipeline sizes.

Pure arithmetic on integers: every rank computes the same answer (or raises the same
`UserError`) before any process group exists or any tensor moves, so a bad layout can
never leave some stages waiting in a receive for a stage that gave up.
"""

from __future__ import annotations

from typing import Sequence

from trident.errors import UserError


def balanced_split(n_layers: int, pp: int) -> list[range]:
    """Split `n_layers` into `pp` contiguous ranges whose sizes differ by at most one.

    When the layers do not divide evenly, the extra layers go to the middle stages
    first, then to the first stage, and to the last stage only when nothing else is
    left: the last stage also runs the final norm, the vocabulary projection and the
    loss (the heaviest non-layer work), the first stage only an embedding lookup.
    """
    check_stage_count(n_layers, pp)
    sizes = [n_layers // pp] * pp
    preference = list(range(1, pp - 1)) + [0] + ([pp - 1] if pp > 1 else [])
    for stage in preference[: n_layers % pp]:
        sizes[stage] += 1
    return _ranges(sizes)


def explicit_split(layers_per_stage: Sequence[int], n_layers: int, pp: int) -> list[range]:
    """Validate a user-given number of layers per stage and turn it into ranges.

    Uneven splits are allowed (e.g. ``[3, 4, 4, 3]`` to offset the embedding and the
    head); the list must have one entry per stage, each at least one, summing to `n_layers`.
    """
    check_stage_count(n_layers, pp)
    sizes = list(layers_per_stage)
    if len(sizes) != pp:
        raise UserError(f"the layer split {sizes} has {len(sizes)} stages but pp={pp}; give one layer count per stage")
    bad = [s for s in sizes if not isinstance(s, int) or isinstance(s, bool) or s < 1]
    if bad:
        raise UserError(f"the layer split {sizes} has a stage with {bad[0]!r} layers; every stage needs a whole number >= 1")
    if sum(sizes) != n_layers:
        raise UserError(f"the layer split {sizes} sums to {sum(sizes)} layers but model.n_layers={n_layers}")
    return _ranges(sizes)


def stage_layers(n_layers: int, pp: int, split: Sequence[int] | None = None) -> list[range]:
    """The layer range of every stage: the explicit `split` when given, else balanced."""
    return balanced_split(n_layers, pp) if split is None else explicit_split(split, n_layers, pp)


def check_stage_count(n_layers: int, pp: int) -> None:
    if not isinstance(pp, int) or pp < 1:
        raise UserError(f"pp must be a whole number >= 1, got {pp!r}")
    if pp > n_layers:
        raise UserError(f"pp={pp} is more than model.n_layers={n_layers}; every stage needs at least one layer")


def num_microbatches(global_batch: int, micro_batch: int, dp: int) -> int:
    """Microbatches each pipeline runs per step: global_batch / (micro_batch * dp), exactly."""
    for name, value in (("global batch size", global_batch), ("micro batch size", micro_batch), ("dp", dp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{name} must be a whole number >= 1, got {value!r}")
    per_step = micro_batch * dp
    if global_batch % per_step != 0:
        raise UserError(
            f"global batch size {global_batch} is not a whole number of microbatches: it must divide by "
            f"micro batch size {micro_batch} * dp {dp} = {per_step}"
        )
    return global_batch // per_step


def _ranges(sizes: list[int]) -> list[range]:
    out, start = [], 0
    for size in sizes:
        out.append(range(start, start + size))
        start += size
    return out
