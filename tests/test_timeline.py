"""The pipeline timeline's figures and the choice of the step it records, without processes.

The multi-process end of it (every rank records the same step, the trace and the log line
of a real run) is checked on the pp>1 layouts of test_train_cli.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from fractions import Fraction

import pytest

from trident.parallel.pipeline import schedule as S
from trident.parallel.pipeline.simulate import simulate_schedule
from trident.parallel.pipeline.timeline import (
    Event,
    chrome_trace,
    drawn_ranks,
    idle_fraction,
    plot_gantt,
    plot_gantts,
    recorded_step,
    summarize,
    write_timeline,
)


@pytest.mark.parametrize(
    "requested, start, last, expected",
    [
        (0, 0, 10, 3),  # the default: the first step after a warm-up of 2
        (0, 0, 3, 3),
        (0, 0, 2, 2),  # a shorter run: its last step
        (0, 0, 1, 1),
        (0, 5, 20, 8),  # resumed at step 5: the warm-up counts from there
        (0, 5, 6, 6),
        (0, 10, 10, 0),  # nothing left to run
        (7, 0, 10, 7),  # explicit: that step ...
        (10, 0, 10, 10),
        (11, 0, 10, 0),  # ... if the run reaches it
        (4, 5, 20, 0),  # or has not passed it already (resumed at 5)
        (6, 5, 20, 6),
    ],
)
def test_recorded_step(requested, start, last, expected):
    assert recorded_step(requested, start, last) == expected


def _replicated(events: list[Event], copies: int) -> list[Event]:
    """The simulated events as if each stage had `copies` ranks (tp x dp), stage-major."""
    return [Event(e.stage, e.stage * copies + k, e.name, e.cat, e.start, e.end, e.mb) for e in events for k in range(copies)]


def test_summary_of_a_simulated_1f1b_step():
    sim = simulate_schedule("1f1b", 4, 8, 1e-3, 2e-3, t_transfer=1e-4)
    s = summarize(sim.events, 3, S.bubble_fraction, "1f1b")
    assert (s.step, s.stages, s.microbatches, s.drawn) == (3, 4, 8, [0, 1, 2, 3])
    assert Fraction(s.theoretical_bubble).limit_denominator(1000) == Fraction(3, 11)
    assert s.theoretical_bubble == S.bubble_fraction(4, 8)  # the schedule's own formula
    assert s.step_time_s == pytest.approx(sim.total)
    assert s.measured_bubble == idle_fraction(sim.events) >= s.theoretical_bubble - 1e-9
    for stage, rank in enumerate(s.drawn):  # 8 forwards + 8 backwards of each stage, over the step
        assert s.busy[rank] == pytest.approx(sim.stage_busy(stage) / sim.total)
        assert 0 < s.busy[rank] <= 1
    assert s.subtitle() is None  # one rank per stage: nothing to say which
    title = s.title()
    assert title.startswith("pipeline timeline of step 3 (1f1b, p=4, m=8): ")
    assert f"{s.step_time_s * 1e3:.1f} ms" in title
    assert f"bubble {s.measured_bubble:.1%} measured vs 27.3% theoretical" in title


def test_summary_names_the_drawn_rank_of_each_stage():
    sim = simulate_schedule("gpipe", 4, 8, 1e-3, 2e-3)
    events = _replicated(sim.events, 2)
    assert drawn_ranks(events) == {0: 0, 1: 2, 2: 4, 3: 6}
    s = summarize(events, 5, S.bubble_fraction, "gpipe", tp=2, dp=1)
    assert s.drawn == [0, 2, 4, 6] and s.microbatches == 8
    assert s.subtitle() == "one rank per stage: ranks 0, 2, 4, 6 (tp=2, dp=1)"
    assert s.theoretical_bubble == pytest.approx(3 / 11)


def test_trace_metadata_and_log_line_carry_the_figures(tmp_path):
    sim = simulate_schedule("1f1b", 4, 8, 1e-3, 2e-3, t_transfer=1e-4)
    events = _replicated(sim.events, 2)
    s = summarize(events, 3, S.bubble_fraction, "1f1b", tp=1, dp=2)
    meta = chrome_trace(events, s)["otherData"]
    assert meta["step"] == 3 and meta["drawn_ranks"] == [0, 2, 4, 6] and (meta["tp"], meta["dp"]) == (1, 2)
    assert meta["theoretical_bubble"] == 3 / 11 and meta["measured_bubble"] == s.measured_bubble
    assert set(meta["busy_share"]) == {"rank 0", "rank 2", "rank 4", "rank 6"}
    assert all(0 < b <= 1 for b in meta["busy_share"].values()) and meta["step_time_s"] > 0
    assert "otherData" not in chrome_trace(events)  # no summary, no metadata

    line = write_timeline(events, tmp_path, 3, S.bubble_fraction, "1f1b", tp=1, dp=2)
    written = json.loads((tmp_path / "timeline.json").read_text())["otherData"]
    assert written == json.loads(json.dumps(meta))
    assert line.startswith(f"pipeline timeline of step 3: {tmp_path / 'timeline.json'}")
    assert f"bubble {s.measured_bubble:.1%} measured vs 27.3% theoretical ((p-1)/(m+p-1), p=4, m=8)" in line
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib" in line  # the trace alone, and the reason
        return
    assert str(tmp_path / "timeline.png") in line
    assert (tmp_path / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gantt_with_a_summary_titles_the_figure(tmp_path, monkeypatch):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed: the PNG part needs the 'plot' extra")
    import matplotlib.figure

    sim = simulate_schedule("1f1b", 4, 8, 1e-3, 2e-3)
    s = summarize(_replicated(sim.events, 2), 4, S.bubble_fraction, tp=2, dp=1)
    seen: dict[str, object] = {}
    save = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):  # read the drawn text before the PNG is written
        ax = fig.axes[0]
        seen["title"] = ax.get_title()
        seen["rows"] = [t.get_text() for t in ax.get_yticklabels()]
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    plot_gantt(_replicated(sim.events, 2), tmp_path / "g.png", summary=s)
    assert seen["title"] == s.title() + "\none rank per stage: ranks 0, 2, 4, 6 (tp=2, dp=1)"
    assert seen["rows"] == [f"stage {i} (rank {2 * i})\nbusy {s.busy[2 * i]:.0%}" for i in range(4)]


@pytest.mark.parametrize("name, vpp", [("interleaved", 2), ("interleaved", 3), ("zb-h1", 1), ("gpipe", 1)])
def test_summary_of_other_schedules_counts_weight_passes_and_distinct_microbatches(name, vpp, tmp_path):
    """W passes are compute (busy, not bubble); with chunks a microbatch counts once, so the
    trainer's ``partial(bubble_fraction, name=..., vpp=...)`` gets the real m; with free
    transfers and tf = tB = tW the measured bubble is the formula's exactly."""
    sim = simulate_schedule(name, 4, 8, 1e-3, 2e-3, vpp=vpp, t_weight=1e-3)
    bubble = functools.partial(S.bubble_fraction, name=name, vpp=vpp)
    s = summarize(sim.events, 3, bubble, name)
    assert (s.stages, s.microbatches, s.vpp) == (4, 8, vpp)
    assert s.theoretical_bubble == pytest.approx(S.bubble_fraction(4, 8, name, vpp))
    assert s.measured_bubble == pytest.approx(s.theoretical_bubble)
    assert s.step_time_s == pytest.approx(S.ideal_time(4, 8, 1e-3, 2e-3, name, vpp, t_weight=1e-3))
    for stage, rank in enumerate(s.drawn):
        assert s.busy[rank] == pytest.approx(sim.stage_busy(stage) / sim.total)
    assert s.busy[0] == pytest.approx(8 * 3e-3 / sim.total)  # forward + B + W of every microbatch
    assert f"({name}, {'p=4, v=%d, m=8' % vpp if vpp > 1 else 'p=4, m=8'}): " in s.title()
    line = write_timeline(sim.events, tmp_path, 3, bubble, name, tp=1, dp=1)
    formula = {"interleaved": "(p-1)/(v*m+p-1)", "zb-h1": "(p-1)/(3m+p-1)", "gpipe": "(p-1)/(m+p-1)"}[name]
    layout = f"p=4, v={vpp}, m=8" if vpp > 1 else "p=4, m=8"
    assert f"theoretical ({formula}" in line and f", {layout})" in line, line
    meta = json.loads((tmp_path / "timeline.json").read_text())["otherData"]
    assert meta["schedule"] == name and meta["vpp"] == vpp


def test_weight_passes_in_the_trace_and_the_idle_share():
    zb = simulate_schedule("zb-h1", 2, 2, 1.0, 2.0)  # tW = tb / 2
    weights = [e for e in zb.events if e.cat == "weight"]
    assert sorted(e.name for e in weights) == ["W0", "W0", "W1", "W1"]
    assert all(e.duration == 1.0 for e in weights)
    busy = sum(e.duration for e in zb.events if e.cat != "transfer")
    assert idle_fraction(zb.events) == pytest.approx(1 - busy / (2 * zb.total))
    spans = {e["name"]: e for e in chrome_trace(zb.events)["traceEvents"] if e["ph"] == "X" and e["pid"] == 0}
    assert spans["W0"]["cat"] == "weight" and spans["W0"]["args"] == {"microbatch": 0}
    assert {spans[n]["cname"] for n in ("F0", "B0", "W0")} == {
        "thread_state_runnable", "thread_state_running", "thread_state_iowait"}  # blue, green, orange
    chunked = simulate_schedule("interleaved", 2, 2, vpp=2).events
    assert {(e.name, e.chunk) for e in chunked if e.stage == 0 and e.mb == 1 and e.cat == "forward"} == {
        ("F1", 0), ("F1.1", 1)}
    assert {e.chunk for e in chunked if e.cat == "transfer"} == {0}  # "send act 1.1" is no compute


def test_schedules_side_by_side_in_one_png(tmp_path, monkeypatch):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed: the PNG part needs the 'plot' extra")
    import matplotlib.figure

    panels = [(name, simulate_schedule(name, 4, 8, 1e-3, 2e-3, vpp=2 if name == "interleaved" else 1).events)
              for name in ("1f1b", "interleaved", "zb-h1")]
    seen: dict[str, object] = {}
    save = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):
        seen["titles"] = [ax.get_title() for ax in fig.axes]
        seen["legend"] = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    png = plot_gantts(panels, tmp_path / "schedules.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert seen == {"titles": ["1f1b", "interleaved", "zb-h1"], "legend": ["forward", "backward", "weight", "transfer"]}
