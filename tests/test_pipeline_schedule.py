"""Pipeline schedules, stage splits and the timeline, without processes.

The schedule lists are checked as data for many (p, vpp, m); the simulator runs every
stage's plan together with rendezvous transfers matched per rank pair in posting order (as
NCCL does), which times each schedule against its formula and proves that no (p, vpp, m)
in the range can deadlock or pair the wrong tensors.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from trident.errors import UserError
from trident.parallel.pipeline import schedule as S
from trident.parallel.pipeline.simulate import DeadlockError, simulate, simulate_schedule
from trident.parallel.pipeline.stages import balanced_split, explicit_split, num_microbatches, stage_layers
from trident.parallel.pipeline.timeline import chrome_trace, idle_fraction, plot_gantt, write_chrome_trace

SIZES = [(p, m) for p in range(1, 9) for m in [*range(1, 14), 16, 24]]  # m < p, = p, > p for every p
# interleaved: m a multiple of p; m = p is the all-forwards-first special case
VIRTUAL = [(p, v, m) for p in range(2, 7) for v in (2, 3, 4) for m in (p, 2 * p, 3 * p, 4 * p)]
VIRTUAL += [(p, v, m) for p in (7, 8) for v in (2, 3) for m in (p, 2 * p)]


def cases(name: str) -> list[tuple[int, int, int]]:
    """(p, vpp, m) for which `name` runs."""
    return VIRTUAL if name == "interleaved" else [(p, 1, m) for p, m in SIZES]


def virtual_stage(e, p: int) -> int:
    """Chunk c of rank r is virtual stage c*p + r."""
    return e.chunk * p + e.stage


# --- schedule lists ---------------------------------------------------------------------------
def test_1f1b_phases_match_the_issue_example():
    steps = S.one_f_one_b(4, 0, 8)
    assert [str(s) for s in steps[:3]] == ["F0", "F1", "F2"]  # warm-up 3
    assert [str(s) for s in steps[3:13]] == ["F3", "B0", "F4", "B1", "F5", "B2", "F6", "B3", "F7", "B4"]  # steady 5
    assert [str(s) for s in steps[13:]] == ["B5", "B6", "B7"]  # cool-down 3
    last = S.one_f_one_b(4, 3, 8)
    assert [str(s) for s in last] == [f"{k}{i}" for i in range(8) for k in "FB"]  # 0 / 8 / 0
    assert S.format_schedule("1f1b", 2, 2) == "stage 0: F0 F1 B0 B1\nstage 1: F0 B0 F1 B1"


def test_format_schedule_names_chunks_and_weight_passes():
    assert S.format_schedule("interleaved", 2, 2, 2) == (
        "stage 0: F0 F1 F0.1 F1.1 B0.1 B1.1 B0 B1\nstage 1: F0 F1 F0.1 F1.1 B0.1 B1.1 B0 B1"
    )  # m = p: every forward first
    lines = S.format_schedule("interleaved", 2, 4, 2).splitlines()
    assert lines[0] == "stage 0: F0 F1 F0.1 F1.1 F2 B0.1 F3 B1.1 F2.1 B0 F3.1 B1 B2.1 B3.1 B2 B3"
    assert S.format_schedule("zb-h1", 2, 3).splitlines() == [
        "stage 0: F0 F1 B0 W0 F2 B1 W1 B2 W2", "stage 1: F0 B0 F1 B1 W0 F2 B2 W1 W2",
    ]


@pytest.mark.parametrize("name", list(S.SCHEDULES))
def test_every_chunk_runs_each_microbatch_forward_then_backward_once(name):
    """Per chunk: F0..F(m-1) once each in order, then each B after its F, and under ZB-H1
    each W after its B; no W in a schedule that does not split the backward."""
    for p, v, m in cases(name):
        for r in range(p):
            steps = S.schedule_steps(name, p, r, m, v)
            assert {s.kind for s in steps} == ({"F", "B", "W"} if name in S.SPLIT_BACKWARD else {"F", "B"})
            for c in range(v):
                for kind in {s.kind for s in steps}:
                    assert [s.mb for s in steps if s.kind == kind and s.chunk == c] == list(range(m)), (name, p, v, m, r)
            where = {(s.kind, s.key): k for k, s in enumerate(steps)}
            assert len(where) == len(steps)  # nothing twice
            for c in range(v):
                for i in range(m):
                    assert where[("F", (c, i))] < where[("B", (c, i))] < where.get(("W", (c, i)), len(steps))


def _b_pending_peak(steps: list[S.Step]) -> int:
    """Most microbatches forwarded and not yet B'd (the activations a B still needs)."""
    held = peak = 0
    for s in steps:
        held += {"F": 1, "B": -1}.get(s.kind, 0)
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("name", list(S.SCHEDULES))
def test_in_flight_bound_of_each_schedule(name):
    for p, v, m in cases(name):
        for r in range(p):
            steps = S.schedule_steps(name, p, r, m, v)
            peak = S.peak_in_flight(steps)
            assert peak == S.in_flight_limit(name, p, r, m, v)
            if name == "1f1b":
                assert peak == min(p - r, m)
                assert steps[: min(p - r - 1, m)] == [S.F(i) for i in range(min(p - r - 1, m))]
            elif name == "gpipe":
                assert peak == m
            elif name == "zb-h1":  # until its W: 1F1B's rank-0 peak on every rank; until its B: 1F1B's own
                assert peak == min(p, m) <= p
                assert _b_pending_peak(steps) == min(p - r, m)
            else:  # warm-up 2(p-r-1) + (v-1)p forwards, then one more; all m*v when m = p
                assert peak == (m * v if m == p else min(2 * (p - r - 1) + (v - 1) * p + 1, m * v)), (p, v, m, r)
                if r == 0:  # (p-1)·2 + (v-1)·p + 1 chunk-microbatches, at most m·v: with m > p that is
                    assert peak == min((p - 1) * 2 + (v - 1) * p + 1, m * v)  # 1 + (p-1)/(p v) times
                    if m > p:  # 1F1B's p microbatches (a chunk's activations are 1/v of a rank's)
                        assert peak / v == pytest.approx(p * (1 + (p - 1) / (p * v)))


@pytest.mark.parametrize("name", [*S.SCHEDULES, "forward-only"])
def test_plans_never_deadlock_and_respect_cross_stage_order(name):
    """In a simulation with transfers of 0.25: the forward of virtual stage s+1 starts after
    that of s ended plus a transfer, the B of s after the B of s+1, the last stage's B after
    its F, and each W after its B."""
    runs = cases("interleaved") + cases("1f1b") if name == "forward-only" else cases(name)
    for p, v, m in runs:
        make = S.forward_only if name == "forward-only" else S.SCHEDULES[name]
        sim = simulate([S.plan(make(p, r, m, v), r, p, v) for r in range(p)], 1.0, 2.0, t_transfer=0.25)
        at = {(e.cat, virtual_stage(e, p), e.mb): e for e in sim.events if e.cat != "transfer"}
        last = p * v - 1
        for i in range(m):
            for s in range(last):
                assert at[("forward", s + 1, i)].start >= at[("forward", s, i)].end + 0.25 - 1e-9, (name, p, v, m)
                if name != "forward-only":
                    assert at[("backward", s, i)].start >= at[("backward", s + 1, i)].end + 0.25 - 1e-9
            if name != "forward-only":
                assert at[("backward", last, i)].start >= at[("forward", last, i)].end
            if name in S.SPLIT_BACKWARD:
                for s in range(last + 1):
                    assert at[("weight", s, i)].start >= at[("backward", s, i)].end


def test_interleaved_on_two_ranks_pairs_every_transfer_in_posting_order():
    """At p = 2 the previous and the next rank are one rank: the simulator matches the
    operations of that rank pair in posting order, whatever they carry (NCCL has no tags),
    so finishing without a ValueError or a deadlock means the plans are NCCL-safe."""
    for v in (2, 3, 4):
        for m in (2, 4, 6, 8):
            for t in (0.0, 0.3):
                sim = simulate_schedule("interleaved", 2, m, 1.0, 2.0, t_transfer=t, vpp=v)
                assert sim.total >= S.ideal_time(2, m, 1.0, 2.0, "interleaved", v) - 1e-9


def test_simulated_time_is_each_schedules_formula():
    """With tf=1, tb=2 (tB = tW = 1) and free transfers the simulated step is exactly:
    1F1B, GPipe (m+p-1)(tf+tb); interleaved (m v+p-1)(tf+tb)/v; ZB-H1 m(tf+tb) +
    (p-1)(tf+tB-tW) once m >= p (with fewer microbatches the pipeline never fills: there it
    is (m+p-1)(tf+tB) + tW, no slower than 1F1B)."""
    for name in S.SCHEDULES:
        for p, v, m in cases(name):
            sim = simulate_schedule(name, p, m, 1.0, 2.0, vpp=v, t_weight=1.0)
            ideal = S.ideal_time(p, m, 1.0, 2.0, name, v, t_weight=1.0)
            if name == "zb-h1" and m < p:
                assert sim.total <= S.ideal_time(p, m, 1.0, 2.0) + 1e-9, (name, p, m)
                assert sim.total == pytest.approx((m + p - 1) * 2.0 + 1.0), (name, p, m)
            else:
                assert sim.total == pytest.approx(ideal, abs=1e-9), (name, p, v, m)
            assert sim.stage_busy(0) == pytest.approx(3.0 * m)
    assert S.ideal_time(4, 8, 1.0, 2.0, "zb-h1", t_weight=1.0) == 8 * 3 + 3 * (1 + 1 - 1)
    assert S.ideal_time(4, 8, 1.0, 2.0, "interleaved", 2) == (8 * 2 + 3) * 3 / 2


def test_bubbles_of_the_new_schedules_against_1f1b():
    assert S.bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert S.bubble_fraction(4, 8, "gpipe") == pytest.approx(3 / 11)
    assert S.bubble_fraction(4, 8, "zb-h1") == pytest.approx(3 / (3 * 8 + 3))
    for p, v, m in VIRTUAL:
        interleaved = S.bubble_fraction(p, m, "interleaved", v)
        assert interleaved == pytest.approx((p - 1) / (v * m + p - 1))
        assert interleaved < S.bubble_fraction(p, m)
    # ZB-H1's measured idle share (tf = tB = tW) is at most half of 1F1B's
    one = simulate_schedule("1f1b", 4, 8, 1.0, 2.0)
    zb = simulate_schedule("zb-h1", 4, 8, 1.0, 2.0, t_weight=1.0)
    assert idle_fraction(one.events) == pytest.approx(3 / 11)
    assert idle_fraction(zb.events) == pytest.approx(S.bubble_fraction(4, 8, "zb-h1"))
    assert idle_fraction(zb.events) <= idle_fraction(one.events) / 2
    assert sum(e.cat == "weight" for e in zb.events) == 4 * 8


def test_simulator_detects_deadlock_and_mismatched_order():
    # both stages first wait to receive from the other: a cycle
    stuck = [
        [S.Exchange((S.Transfer("recv", "grad", "next", 0),)), S.Exchange((S.Transfer("send", "act", "next", 0),))],
        [S.Exchange((S.Transfer("send", "grad", "prev", 0),)), S.Exchange((S.Transfer("recv", "act", "prev", 0),))],
    ]
    stuck[1] = stuck[1][::-1]
    with pytest.raises(DeadlockError, match="stage 0 waits"):
        simulate(stuck)
    swapped = [S.plan(S.one_f_one_b(2, 0, 2), 0, 2), S.plan(S.one_f_one_b(2, 1, 2)[::-1], 1, 2)]
    with pytest.raises((ValueError, DeadlockError)):
        simulate(swapped)


@pytest.mark.parametrize("name, p, v, m", [("interleaved", 2, 2, 4), ("interleaved", 4, 2, 8), ("zb-h1", 4, 1, 8)])
def test_a_plan_with_two_steps_swapped_is_caught(name, p, v, m):
    """Rank 1 runs two forwards in the other order: its receives no longer pair with the
    sends of its neighbour, and the simulator says so instead of mixing the tensors."""
    plans = [S.plan(S.schedule_steps(name, p, r, m, v), r, p, v) for r in range(p)]
    simulate(plans)
    steps = S.schedule_steps(name, p, 1, m, v)
    a, b = steps.index(S.F(0, v - 1)), steps.index(S.F(1, v - 1))
    steps[a], steps[b] = steps[b], steps[a]
    plans[1] = S.plan(steps, 1, p, v)
    with pytest.raises(ValueError, match=r"operation \d+ is \('act', \d+, [01]\)"):
        simulate(plans)


def test_schedule_argument_errors():
    with pytest.raises(UserError, match="microbatches must be a whole number"):
        S.one_f_one_b(4, 0, 0)
    with pytest.raises(UserError, match="stage 4 is outside a pipeline of 4"):
        S.gpipe(4, 4, 2)
    with pytest.raises(UserError, match="unknown pipeline schedule 'zb'"):
        S.schedule_steps("zb", 2, 0, 2)


@pytest.mark.parametrize(
    "name, p, m, v, words",
    [
        ("interleaved", 4, 6, 2, ["groups of pp=4", "6 per step", "a multiple of 4"]),
        ("interleaved", 4, 8, 1, ["pp=4, vpp=1", "pp_schedule 1f1b"]),
        ("interleaved", 1, 4, 2, ["pp=1, vpp=2"]),
        ("1f1b", 4, 8, 2, ["'1f1b'", "parallel.vpp=2", "pp_schedule interleaved"]),
        ("zb-h1", 2, 4, 3, ["'zb-h1'", "parallel.vpp=3"]),
        ("gpipe", 2, 4, 0, ["parallel.vpp", "got 0"]),
    ],
)
def test_layout_errors_are_one_sentence_naming_the_numbers(name, p, m, v, words):
    for call in (lambda: S.schedule_steps(name, p, 0, m, v), lambda: S.check_layout(name, p, m, v)):
        with pytest.raises(UserError) as err:
            call()
        text = str(err.value)
        assert "\n" not in text and all(w in text for w in words), text


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
    sim = simulate_schedule("1f1b", 4, 8, 1e-3, 2e-3, t_transfer=1e-4)
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
