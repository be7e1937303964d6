"""`trident bench stage-memory`: freeing sent stage outputs saves exactly the outputs kept.

Byte counts are deterministic (no timing): at pp=2 with m=4 microbatches of [2, 32, 64]
fp32 activations (16 KiB each), the first rank of 1F1B keeps 2 outputs in flight, GPipe 4,
interleaved (vpp 2) more chunks; the last rank sends nothing and saves nothing.
"""

from __future__ import annotations

ACT = 2 * 32 * 64 * 4  # bytes of one stage output


def test_freed_outputs_save_the_kept_outputs(capsys):
    from trident.tools.cli import main

    assert main(["bench", "stage-memory", "--pp", "2", "-m", "4", "--layers", "4", "--hidden", "64", "--seq", "32"]) == 0
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0] in ("1f1b", "interleaved", "zb-h1", "gpipe"):
            name, rank, in_flight = cells[0], int(cells[1]), int(cells[2])
            kept, freed, saved = (float(cells[i]) * 2**20 for i in (3, 5, 7))
            rows[(name, rank)] = (in_flight, kept, freed, saved)
    assert len(rows) == 8, out
    # saved = outputs the first rank would keep for their backward after sending them
    assert rows[("1f1b", 0)][0] == 2 and abs(rows[("1f1b", 0)][3] - 2 * ACT) < 0.01 * 2**20
    assert abs(rows[("gpipe", 0)][3] - 4 * ACT) < 0.01 * 2**20
    for name in ("1f1b", "interleaved", "zb-h1", "gpipe"):
        assert rows[(name, 0)][2] < rows[(name, 0)][1] or name == "zb-h1", (name, rows[(name, 0)])
        assert rows[(name, 0)][3] >= 0
    assert rows[("interleaved", 1)][3] > 0  # with chunks the last rank also sends (to rank 0)
    assert rows[("gpipe", 1)][3] == 0  # the last rank sends nothing forward


def test_stage_memory_rejects_a_layout_it_cannot_run(capsys):
    from trident.tools.cli import main

    assert main(["bench", "stage-memory", "--pp", "2", "-m", "3"]) == 2
    assert "groups of pp=2, but there are 3 per step" in capsys.readouterr().err
