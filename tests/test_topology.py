"""Layout arithmetic without processes, and the real groups on 8 gloo ranks."""

from __future__ import annotations

import pytest

from trident.errors import UserError
from trident.parallel.topology import Layout, resolve_layout


def test_megatron_rank_order_world16_tp2_pp4():
    layout = resolve_layout(16, tp=2, pp=4)
    assert layout.dp == 2
    assert layout.tp_groups()[0] == [0, 1]
    assert layout.dp_groups()[0] == [0, 2]
    assert layout.pp_groups()[0] == [0, 4, 8, 12]
    assert len(layout.tp_groups()) == 8 and len(layout.dp_groups()) == 8 and len(layout.pp_groups()) == 4
    assert layout.embedding_groups()[0] == [0, 12]
    # every rank appears exactly once in each family of groups
    for groups in (layout.tp_groups(), layout.dp_groups(), layout.pp_groups()):
        assert sorted(r for g in groups for r in g) == list(range(16))
    for rank in range(16):
        assert layout.rank_of(*layout.coords(rank)) == rank
    assert layout.coords(13) == (3, 0, 1)


def test_tp_block_groups_split_each_tp_group():
    layout = Layout(tp=4, pp=1, dp=2)
    assert layout.tp_block_groups(2) == [[0, 1], [2, 3], [4, 5], [6, 7]]


@pytest.mark.parametrize(
    "world, tp, pp, dp, words",
    [
        (8, 3, 1, None, "world size 8 is not divisible by tp*pp = 3*1 = 3"),
        (8, 2, 2, 4, "dp=4 disagrees with world size 8 / (tp=2 * pp=2) = 2"),
        (8, 0, 1, None, "tp must be a whole number >= 1, got 0"),
        (8, 1, -2, None, "pp must be a whole number >= 1, got -2"),
        (8, 1, 1, 0, "dp must be a whole number >= 1"),
        (6, 4, 1, None, "world size 6 is not divisible by tp*pp = 4*1 = 4"),
    ],
)
def test_bad_layouts_raise_one_sentence_naming_the_numbers(world, tp, pp, dp, words):
    with pytest.raises(UserError) as info:
        resolve_layout(world, tp, pp, dp)
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_dp_is_derived_or_checked():
    assert resolve_layout(8, 2, 2).dp == 2
    assert resolve_layout(8, 2, 2, 2).dp == 2


def test_from_env_without_launcher_variables_says_how_to_launch(monkeypatch):
    from trident.parallel.topology import Topology

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(UserError, match="torchrun"):
        Topology.from_env(tp=1)


def _groups_on_8() -> dict:
    import torch
    import torch.distributed as dist

    from trident.parallel.topology import Topology

    topo = Topology.from_initialized(tp=2, pp=2)

    def members(group) -> list[int]:
        mine = torch.tensor([dist.get_rank()])
        out = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, mine, group=group)
        return [int(t) for t in out]

    return {
        "coords": [topo.pp_rank, topo.dp_rank, topo.tp_rank],
        "tp": members(topo.tp_group),
        "dp": members(topo.dp_group),
        "pp": members(topo.pp_group),
        "emb": members(topo.embedding_group),
        "prev": topo.pp_prev_rank,
        "next": topo.pp_next_rank,
    }


def test_real_groups_match_the_layout(dist_pool):
    results = dist_pool.run(8, "test_topology:_groups_on_8")
    layout = Layout(tp=2, pp=2, dp=2)
    for rank, res in enumerate(results):
        pp_rank, dp_rank, tp_rank = layout.coords(rank)
        assert res["coords"] == [pp_rank, dp_rank, tp_rank]
        assert rank in res["tp"] and res["tp"] in layout.tp_groups()
        assert res["dp"] in layout.dp_groups() and res["pp"] in layout.pp_groups()
        assert res["emb"] == res["pp"]  # pp=2: the first and last stage are the whole pipeline
        assert res["prev"] == (None if pp_rank == 0 else rank - 4)
        assert res["next"] == (None if pp_rank == 1 else rank + 4)


def _bad_layout_on_every_rank() -> str:
    from trident.parallel.topology import Topology

    try:
        Topology.from_initialized(tp=3)
    except UserError as err:
        return str(err)
    return "no error"


def test_bad_layout_fails_on_every_rank_without_hanging(dist_pool):
    msgs = dist_pool.run(4, "test_topology:_bad_layout_on_every_rank", timeout=60)
    assert msgs == ["world size 4 is not divisible by tp*pp = 3*1 = 3; choose tp and pp whose product divides 4"] * 4


def test_cp_rank_order_is_tp_then_cp_then_dp_then_pp():
    """Megatron's order: a cp group is contiguous right after tp; dp x cp holds equal weights."""
    layout = Layout(tp=2, pp=2, dp=2, cp=2)
    assert layout.world == 16
    assert layout.cp_groups()[:3] == [[0, 2], [1, 3], [4, 6]]
    assert layout.dp_groups()[:2] == [[0, 4], [1, 5]]
    assert layout.dp_cp_groups()[:2] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert layout.pp_groups()[0] == [0, 8]
    for rank in range(layout.world):
        pp, dp, tp = layout.coords(rank)
        cp = layout.cp_of(rank)
        assert layout.rank_of(pp, dp, tp, cp) == rank
        assert rank == ((pp * 2 + dp) * 2 + cp) * 2 + tp
    # every rank of a dp x cp group has the same (pp, tp): the same weights
    for group in layout.dp_cp_groups():
        assert len({(layout.coords(r)[0], layout.coords(r)[2]) for r in group}) == 1


@pytest.mark.parametrize(
    "world, tp, pp, dp, cp, words",
    [
        (8, 2, 1, None, 3, "world size 8 is not divisible by tp*cp*pp = 2*3*1 = 6; choose tp, cp and pp"),
        (8, 1, 1, 2, 2, "dp=2 disagrees with world size 8 / (tp=1 * cp=2 * pp=1) = 4"),
        (8, 1, 1, None, 0, "cp must be a whole number >= 1, got 0"),
    ],
)
def test_bad_cp_layouts_name_the_numbers(world, tp, pp, dp, cp, words):
    with pytest.raises(UserError) as info:
        resolve_layout(world, tp, pp, dp, cp)
    assert words in str(info.value)


def test_cp_needs_a_sequence_of_2cp_chunks():
    import torch

    from trident.parallel.context.sharding import check_cp, load_balanced_index, shard_sequence

    with pytest.raises(UserError, match="sequence length 12 is not divisible by 2\\*cp = 8"):
        check_cp(12, 4)
    index = load_balanced_index(16, 4)
    assert index.tolist() == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
    x = torch.arange(32).view(2, 16)
    assert shard_sequence(x, 4, 1).tolist() == [[2, 3, 12, 13], [18, 19, 28, 29]]
    # the shards are a permutation of the sequence: every token on exactly one rank
    assert sorted(index.flatten().tolist()) == list(range(16))
