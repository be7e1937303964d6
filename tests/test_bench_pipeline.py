"""`trident bench pipeline`: every schedule's row from one small run, and its argument errors.

The ranks run in the harness's workers (a hard timeout, every rank's traceback on a
hang); nothing here is timed: the figures are only checked to be there and consistent.
"""

from __future__ import annotations

import re

import pytest

from cli_helpers import trident
from trident.parallel.pipeline.schedule import SCHEDULES
from trident.tools.bench_pipeline import format_report, ideal, make_config
from trident.tools.cli import build_parser, main

TINY = ["--pp", "2", "-m", "4", "--tf-ms", "1", "--tb-ms", "2", "--steps", "1", "--warmup", "1",
        "--hidden", "8", "--seq", "4"]


def _config(*argv: str) -> dict:
    return make_config(build_parser().parse_args(["bench", "pipeline", *argv]))


def _rows(report: str) -> dict[str, list[str]]:
    """schedule -> the figures of its row."""
    names = "|".join(map(re.escape, SCHEDULES))
    return {m.group(1): m.group(2).split() for m in re.finditer(rf"^  ({names})(?: \(v=\d\))? +(\d.*)$", report, re.M)}


def test_every_schedule_runs_and_gets_its_row(dist_pool, tmp_path):
    config = _config(*TINY, "--trace", str(tmp_path))
    assert config["runs"] == [["1f1b", 4, 1], ["interleaved", 4, 2], ["zb-h1", 4, 1], ["gpipe", 4, 1]]
    result = dist_pool.run(2, "trident.tools.bench_pipeline_stage:bench_rank", timeout=120, config=config)[0]
    report = format_report(result)
    rows = _rows(report)
    assert list(rows) == list(SCHEDULES), report
    for run in result["results"]:
        figures = rows[run["schedule"]]
        step, best = float(figures[0]), float(figures[2].rstrip("*"))
        assert step > 0 and best == pytest.approx(ideal(2, run)[0], abs=1e-4)
        assert run["seen"]["weight"] > 0 if run["schedule"] == "zb-h1" else run["seen"]["weight"] == 0
        assert 0 <= run["idle"] < 1
    assert "interleaved (v=2)" in report and "zb-h1 idle share / 1f1b's:" in report
    for name in SCHEDULES:  # a trace and a Gantt chart per schedule, and the side-by-side picture
        assert (tmp_path / f"pipeline_{name}_m4.json").exists()
    assert f"wrote {tmp_path / 'pipeline_schedules_m4.png'}" in report or "no PNG" in report


def test_planned_runs():
    assert _config("--schedule", "zb-h1", "-m", "8", "16")["runs"] == [["zb-h1", 8, 1], ["zb-h1", 16, 1]]
    assert _config("--schedule", "interleaved", "--vpp", "3")["runs"] == [["interleaved", 8, 3]]
    config = _config("-m", "6")  # interleaved cannot run m=6 on 4 ranks: left out, with the reason
    assert [r[0] for r in config["runs"]] == ["1f1b", "zb-h1", "gpipe"]
    assert config["notes"] == [
        "interleaved left out at m=6: the interleaved schedule runs microbatches in groups of pp=4, but there "
        "are 6 per step; make global_batch / (micro_batch * dp) a multiple of 4"
    ]
    assert [r[0] for r in _config("--pp", "1")["runs"]] == ["1f1b", "zb-h1", "gpipe"]
    assert _config()["tw_ms"] == 40.0 and _config("--tw-ms", "4")["tw_ms"] == 4.0  # tb / 2 unless given


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--schedule", "zb"], ["unknown pipeline schedule 'zb'", "zb-h1", "all"]),
        (["--schedule", "interleaved", "-m", "6"], ["groups of pp=4", "6 per step"]),
        (["--schedule", "1f1b", "--vpp", "2"], ["'1f1b'", "vpp=2"]),
        (["--vpp", "1"], ["pp=4, vpp=1"]),
        (["-m", "6", "--vpp", "2"], ["groups of pp=4", "6 per step"]),
        (["--tw-ms", "90"], ["--tw-ms", "--tb-ms=80.0", "got 90.0"]),
        (["-m", "8", "0"], ["--microbatches", "8 0"]),
        (["--tf-ms", "-1"], ["--tf-ms", "-1.0"]),
    ],
)
def test_argument_errors_are_one_sentence(argv, words, capsys):
    assert main(["bench", "pipeline", *argv]) == 2  # before any process starts
    err = capsys.readouterr().err.strip()
    assert err.startswith("trident bench: error: ") and "\n" not in err, err
    assert all(w in err for w in words), err


def test_the_command_end_to_end():
    """The spawned processes of the real command, shrunk (the subprocess has a hard timeout)."""
    out = trident("bench", "pipeline", *TINY, "--schedule", "zb-h1", "--steps", "1", timeout=120).stdout
    assert list(_rows(out)) == ["zb-h1"] and "pp=2" in out and "W=1.00 ms under zb-h1" in out
