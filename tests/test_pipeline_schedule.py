"""Pipeline schedules, stage splits and the timeline, without processes.

The schedule lists are checked as data for many (p, m); the simulator runs every stage's
plan together with rendezvous transfers, which both times the schedule and proves that
no (p, m) in the range can deadlock.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from trident.errors import UserError
from trident.parallel.pipeline.stages import balanced_split, explicit_split, num_microbatches, stage_layers
from trident.parallel.pipeline import schedule as S
from trident.parallel.pipeline.timeline import chrome_trace, idle_fraction, plot_gantt, write_chrome_trace

SIZES = [(p, m) for p in range(1, 9) for m in range(1, 25)]


# --- schedule lists ---------------------------------------------------------------------------
def test_1f1b_phases_match_the_issue_example():
    steps = S.one_f_one_b(4, 0, 8)
    assert [str(s) for s in steps[:3]] == ["F0", "F1", "F2"]  # warm-up 3
    assert [str(s) for s in steps[3:13]] == ["F3", "B0", "F4", "B1", "F5", "B2", "F6", "B3", "F7", "B4"]  # steady 5
    assert [str(s) for s in steps[13:]] == ["B5", "B6", "B7"]  # cool-down 3
    last = S.one_f_one_b(4, 3, 8)
    assert [str(s) for s in last] == [f"{k}{i}" for i in range(8) for k in "FB"]  # 0 / 8 / 0
    assert S.format_schedule("1f1b", 2, 2) == "stage 0: F0 F1 B0 B1\nstage 1: F0 B0 F1 B1"


@pytest.mark.parametrize("name", list(S.SCHEDULES))
def test_every_microbatch_forwarded_then_backwarded_once(name):
    for p, m in SIZES:
        for r in range(p):
            steps = S.schedule_steps(name, p, r, m)
            forwards = [s.mb for s in steps if s.kind == "F"]
            backwards = [s.mb for s in steps if s.kind == "B"]
            assert forwards == list(range(m)) and backwards == list(range(m)), (name, p, r, m)
            for i in range(m):
                assert steps.index(S.F(i)) < steps.index(S.B(i)), (name, p, r, m, i)
            peak = S.peak_in_flight(steps)
            assert peak <= S.in_flight_limit(name, p, r, m), (name, p, r, m)
            if name == "1f1b":
                assert peak == min(p - r, m)
                assert steps[: min(p - r - 1, m)] == [S.F(i) for i in range(min(p - r - 1, m))]


@pytest.mark.parametrize("name", [*S.SCHEDULES, "forward_only"])
def test_plans_never_deadlock_and_respect_cross_stage_order(name):
    for p, m in SIZES:
        if name == "forward_only":
            plans = [S.plan(S.forward_only(p, r, m), r, p) for r in range(p)]
        else:
            plans = [S.plan(S.schedule_steps(name, p, r, m), r, p) for r in range(p)]
        sim = S.simulate(plans, 1.0, 2.0, t_transfer=0.25)  # raises on a deadlock
        at = {(e.stage, e.name): e for e in sim.events if e.cat != "transfer"}
        for i in range(m):
            for r in range(1, p):  # a forward starts after the previous stage's forward ends
                assert at[(r, f"F{i}")].start >= at[(r - 1, f"F{i}")].end + 0.25 - 1e-9
            if name != "forward_only":
                for r in range(p - 1):  # a backward starts after the next stage's backward ends
                    assert at[(r, f"B{i}")].start >= at[(r + 1, f"B{i}")].end + 0.25 - 1e-9
                assert at[(p - 1, f"B{i}")].start >= at[(p - 1, f"F{i}")].end


def test_simulated_time_is_the_ideal_for_uniform_stages():
    for name in S.SCHEDULES:
        for p, m in SIZES:
            sim = S.simulate_schedule(name, p, m, t_forward=1.0, t_backward=2.0)
            assert sim.total == pytest.approx(S.ideal_time(p, m, 1.0, 2.0)), (name, p, m)
            assert sim.stage_busy(0) == pytest.approx(3.0 * m)
    assert S.bubble_fraction(4, 8) == pytest.approx(3 / 11)


def test_simulator_detects_deadlock_and_mismatched_order():
    # both stages first wait to receive from the other: a cycle
    stuck = [
        [S.Exchange((S.Transfer("recv", "grad", "next", 0),)), S.Exchange((S.Transfer("send", "act", "next", 0),))],
        [S.Exchange((S.Transfer("send", "grad", "prev", 0),)), S.Exchange((S.Transfer("recv", "act", "prev", 0),))],
    ]
    stuck[1] = stuck[1][::-1]
    with pytest.raises(S.DeadlockError, match="stage 0 waits"):
        S.simulate(stuck)
    swapped = [S.plan(S.one_f_one_b(2, 0, 2), 0, 2), S.plan(S.one_f_one_b(2, 1, 2)[::-1], 1, 2)]
    with pytest.raises((ValueError, S.DeadlockError)):
        S.simulate(swapped)


def test_schedule_argument_errors():
    with pytest.raises(UserError, match="microbatches must be a whole number"):
        S.one_f_one_b(4, 0, 0)
    with pytest.raises(UserError, match="stage 4 is outside a pipeline of 4"):
        S.gpipe(4, 4, 2)
    with pytest.raises(UserError, match="unknown pipeline schedule 'zb'"):
        S.schedule_steps("zb", 2, 0, 2)


# --- stage splits -------------------------------------------------------------------------------
def test_balanced_split_puts_extra_layers_in_the_middle_then_first():
    assert balanced_split(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert [len(r) for r in balanced_split(10, 4)] == [2, 3, 3, 2]
    assert [len(r) for r in balanced_split(11, 4)] == [3, 3, 3, 2]
    assert [len(r) for r in balanced_split(3, 2)] == [2, 1]
    assert balanced_split(5, 1) == [range(0, 5)]
    for n in range(1, 20):
        for p in range(1, n + 1):
            ranges = balanced_split(n, p)
            sizes = [len(r) for r in ranges]
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
            assert all(a.stop == b.start for a, b in zip(ranges, ranges[1:]))


def test_explicit_split_and_its_errors():
    assert explicit_split([1, 3, 3, 1], 8, 4) == [range(0, 1), range(1, 4), range(4, 7), range(7, 8)]
    assert stage_layers(8, 2, [5, 3]) == [range(0, 5), range(5, 8)]
    with pytest.raises(UserError, match=r"pp=5 is more than model.n_layers=4"):
        balanced_split(4, 5)
    with pytest.raises(UserError, match=r"sums to 7 layers but model.n_layers=8"):
        explicit_split([4, 3], 8, 2)
    with pytest.raises(UserError, match=r"has a stage with 0 layers"):
        explicit_split([8, 0], 8, 2)
    with pytest.raises(UserError, match=r"has 3 stages but pp=2"):
        explicit_split([2, 3, 3], 8, 2)


def test_microbatch_count_must_be_whole():
    assert num_microbatches(32, 2, 4) == 4
    with pytest.raises(UserError, match=r"global batch size 30 .* micro batch size 4 \* dp 2 = 8"):
        num_microbatches(30, 4, 2)
    with pytest.raises(UserError, match="micro batch size must be a whole number"):
        num_microbatches(8, 0, 1)


# --- timeline from a simulated schedule -----------------------------------------------------------
def test_timeline_trace_and_gantt_from_a_simulation(tmp_path):
    sim = S.simulate_schedule("1f1b", 4, 8, 1e-3, 2e-3, t_transfer=1e-4)
    trace = chrome_trace(sim.events)
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len([e for e in spans if e["cat"] == "forward"]) == 4 * 8
    assert {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"} == {
        f"stage {r}" for r in range(4)
    }
    path = write_chrome_trace(sim.events, tmp_path / "trace.json")
    assert json.loads(path.read_text())["traceEvents"]
    # the measured idle share of a simulated step is the bubble plus the transfer time
    assert idle_fraction(sim.events) >= S.bubble_fraction(4, 8) - 1e-9
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed: the PNG part needs the 'plot' extra")
    png = plot_gantt(sim.events, tmp_path / "gantt.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
