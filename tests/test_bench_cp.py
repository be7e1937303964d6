"""`trident bench cp`: one row per cp size with measured figures, and its argument errors.

The run is tiny (256 tokens, cp 1 and 2, one timed step); nothing here is timed: the
figures are only checked to be there, to be numbers, and to agree where they are counts
(activation bytes against the planner, ring bytes against the planner's traffic).
"""

from __future__ import annotations

import re

from trident.tools.cli import main


def _rows(out: str) -> dict[int, list[str]]:
    """cp -> the cells of its row."""
    return {int(m.group(1)): m.group(2).split() for m in re.finditer(r"^ +(\d+) +(\d+ .*)$", out, re.M)}


def test_bench_cp_prints_a_row_per_cp_with_real_numbers(capsys):
    assert main(["bench", "cp", "--seq-len", "256", "--cp", "1", "2", "--steps", "1", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert list(rows) == [1, 2], out
    one, two = rows[1], rows[2]
    assert one[0] == "256" and two[0] == "128"  # tokens per rank
    for cells in (one, two):
        activ, planned, ring_buf, step_ms = (float(c) for c in cells[1:5])
        assert activ > 0 and step_ms > 0
        assert abs(planned / activ - 1) <= 0.01, cells  # the planner agrees with the meter
    assert float(one[3]) == 0 and one[5:10] == ["-"] * 5 and one[-1] == "(base)"
    assert float(two[3]) > 0  # the ring's blocks in flight
    sent, planned_sent, wait_ms, alone_ms = (float(c) for c in two[5:9])
    assert sent > 0 and abs(sent / planned_sent - 1) <= 0.01, two  # what the ring sent is what the planner counts
    assert wait_ms >= 0 and alone_ms > 0
    assert re.fullmatch(r"\d+%", two[9]) and two[10] == "ok", two  # hidden share; within 10% of cp=1's / 2
    assert "check (vs cp=1/N + ring buf)" in out


def test_bench_cp_refuses_a_bad_layout_before_starting(capsys):
    assert main(["bench", "cp", "--seq-len", "100", "--cp", "1", "4"]) == 2
    assert "sequence length 100 is not divisible by 2*cp = 8" in capsys.readouterr().err
    assert main(["bench", "cp", "--heads", "4", "--kv-heads", "3"]) == 2
    assert "--heads 4 must be a multiple of --kv-heads 3" in capsys.readouterr().err
