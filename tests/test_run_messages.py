"""What a run prints at its edges, checked without starting one: the launcher's failure
lines (an error every rank raised shows once, with its ranks; differing errors all show)
and the summary's number formatting. The end-to-end checks are in test_train_cli.py and
test_tools.py, on runs those tests start anyway."""

from __future__ import annotations

import pytest

from trident.tools.launch import failure_lines, rank_ranges
from trident.training.summary import human


@pytest.mark.parametrize("ranks, text", [([3], "(rank 3)"), ([1, 0], "(ranks 0-1)"),
                                         ([0, 1, 2, 5, 7, 8], "(ranks 0-2, 5, 7-8)")])
def test_rank_ranges(ranks, text):
    assert rank_ranges(ranks) == text


def test_an_error_every_rank_raised_is_printed_once():
    msg = "indexed dataset file /x.idx does not exist; give the prefix of a .bin/.idx pair."
    lines = failure_lines("train", {0: 2, 1: 2, 2: 2, 3: 2}, {r: msg for r in range(4)})
    assert lines == ["trident train: error: indexed dataset file /x.idx does not exist; "
                     "give the prefix of a .bin/.idx pair (ranks 0-3)."]


def test_errors_that_differ_between_ranks_all_show():
    lines = failure_lines("train", {0: 2, 1: 2, 2: 2, 3: -15}, {0: "a is bad", 1: "b is bad", 2: "a is bad"})
    assert lines == ["trident train: error: a is bad (ranks 0, 2)", "trident train: error: b is bad (rank 1)",
                     "trident: rank 3 (exit -15) failed"]


def test_a_crash_without_a_sentence_is_still_reported():
    assert failure_lines("demo", {1: 1}, {}) == ["trident: rank 1 (exit 1) failed"]


@pytest.mark.parametrize("n, unit, text", [(139_584, "", "140k"), (1.767e8, "FLOP", "177 MFLOP"),
                                           (8.03e9, "", "8.03G"), (12, "", "12")])
def test_human_magnitudes(n, unit, text):
    assert human(n, unit) == text
