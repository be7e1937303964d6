"""What each pipeline rank did when: events, a Chrome trace, and a PNG Gantt chart.

With a timeline switched on, the executor wraps every forward, backward, weight-gradient
pass (W, zero-bubble schedules) and transfer of a step in `Timeline.span`; `gather_events`
brings every rank's events to one place on a shared time axis; `chrome_trace` /
`write_chrome_trace` produce a file for chrome://tracing or https://ui.perfetto.dev, and
`plot_gantt` draws stages x time with matplotlib (an optional extra, imported only here
and only when asked), so the bubble of a schedule is something a user can see.

`summarize` reads the figures a timeline is looked at for (the step time, each drawn rank's
busy share, the measured bubble next to the schedule's theoretical one) so the picture, the
trace's metadata and the trainer's log line all state them; `recorded_step` picks which
step of a run is recorded, after the one-off start-up costs are over.

The process-free schedule simulator (`parallel.pipeline.simulate`) produces the same
`Event`s, so a planned schedule and a measured one are drawn by the same code. Compute
events are named as their schedule steps: ``F3``, ``B3``, ``W3``, ``F3.1`` (chunk 1).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from trident.errors import UserError

CATEGORIES = ("forward", "backward", "weight", "transfer")
COMPUTE = ("forward", "backward", "weight")  # what counts as busy; transfers and waiting are idle


@dataclass(frozen=True)
class Event:
    """One interval on one rank. Times are seconds on the rank's clock until
    `gather_events` moves them onto a shared axis that starts at 0."""

    stage: int  # pipeline stage (the row of the Gantt chart)
    rank: int  # global rank (a thread of the stage's row in the Chrome trace)
    name: str  # "F3", "B3", "send act 3 + recv grad 1", ...
    cat: str  # forward | backward | weight | transfer
    start: float
    end: float
    mb: int = -1  # microbatch, -1 for events that are not one microbatch's compute

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def chunk(self) -> int:
        """Which of its rank's virtual stages a compute event ran (``F3.1`` -> 1), else 0."""
        head, _, tail = self.name.partition(".")
        return int(tail) if self.cat in COMPUTE and tail.isdigit() and head[1:].isdigit() else 0


class Timeline:
    """Records events on one rank; cheap enough to leave in the code path.

    On CUDA a span synchronises the device at both ends: kernels run asynchronously, so
    without it a span would measure the launch, not the work. That changes the timing of
    the run it measures a little, which is why recording is behind a flag.
    """

    def __init__(self, stage: int, rank: int, device: torch.device | str = "cpu") -> None:
        self.stage, self.rank = stage, rank
        self.device = torch.device(device)
        self.events: list[Event] = []

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextlib.contextmanager
    def span(self, name: str, cat: str, mb: int = -1) -> Iterator[None]:
        start = self._now()
        try:
            yield
        finally:
            self.events.append(Event(self.stage, self.rank, name, cat, start, self._now(), mb))


def span(timeline: Timeline | None, name: str, cat: str, mb: int = -1) -> contextlib.AbstractContextManager:
    """`timeline.span(...)`, or a no-op when recording is off."""
    return contextlib.nullcontext() if timeline is None else timeline.span(name, cat, mb)


def gather_events(timeline: Timeline, group: dist.ProcessGroup | None = None) -> list[Event]:
    """Every rank's events of `group` on one time axis starting at 0, on every rank.

    Collective over `group`. Clocks of different processes (or nodes) have different
    origins, so each rank reads its clock right after a barrier: the barrier ends at
    (nearly) the same instant everywhere, which aligns the clocks to within its latency.
    """
    if not dist.is_initialized():
        return _shift(list(timeline.events), 0.0)
    dist.barrier(group=group)
    sync = time.perf_counter()
    mine = [asdict(e) | {"start": e.start - sync, "end": e.end - sync} for e in timeline.events]
    events = [Event(**e) for part in _all_gather_json(mine, group) for e in part]
    return _shift(events, 0.0)


def _all_gather_json(obj: list[dict], group: dist.ProcessGroup | None) -> list[list[dict]]:
    """Every rank's `obj`, sent as UTF-8 JSON in byte tensors (all_gather_object would pickle)."""
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(dev)
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64, device=dev), group=group)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=dev)
    padded[: data.numel()] = data
    parts = [torch.empty(longest, dtype=torch.uint8, device=dev) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return [json.loads(p[: int(n.item())].cpu().numpy().tobytes()) for p, n in zip(parts, sizes)]


def _shift(events: list[Event], origin: float) -> list[Event]:
    if not events:
        return events
    t0 = min(e.start for e in events) - origin
    shifted = (Event(e.stage, e.rank, e.name, e.cat, e.start - t0, e.end - t0, e.mb) for e in events)
    return sorted(shifted, key=lambda e: (e.stage, e.rank, e.start))


def idle_fraction(events: Iterable[Event]) -> float:
    """Share of stage-time spent outside compute (forward, backward, weight), over the span
    of the events: the measured bubble (transfers and waiting both count as idle)."""
    events = list(events)
    if not events:
        return 0.0
    t0, t1 = min(e.start for e in events), max(e.end for e in events)
    rows = {(e.stage, e.rank) for e in events}
    busy = sum(e.duration for e in events if e.cat in COMPUTE)
    total = (t1 - t0) * len(rows)
    return 1.0 - busy / total if total > 0 else 0.0


WARMUP_STEPS = 2  # steps skipped by default: the first ones carry one-off start-up costs


def recorded_step(requested: int, start_step: int, last_step: int) -> int:
    """The step (numbered from 1) whose timeline a run records, or 0 for none.

    `requested` 0 means the first step after WARMUP_STEPS steps of this process (allocator,
    autograd and communicator set-up make the first backward 10-40x slower than the
    steady state, which would hide the bubble), or the last step when the run is shorter.
    A resumed run counts its warm-up from `start_step`, the step it resumed at. Every
    input is config or checkpoint state, so all ranks choose the same step (gathering the
    events is collective).
    """
    if start_step >= last_step:
        return 0
    if requested == 0:
        return min(start_step + WARMUP_STEPS + 1, last_step)
    return requested if start_step < requested <= last_step else 0


def drawn_ranks(events: Iterable[Event]) -> dict[int, int]:
    """stage -> the lowest rank of that stage: the one row of the Gantt chart per stage
    (tp/dp replicas run the same schedule in lockstep and would overprint)."""
    first: dict[int, int] = {}
    for e in events:
        first[e.stage] = min(first.get(e.stage, e.rank), e.rank)
    return dict(sorted(first.items()))


@dataclass(frozen=True)
class TimelineSummary:
    """The figures of one recorded step, stated on the picture, in the trace and in the log."""

    step: int
    schedule: str
    stages: int
    microbatches: int
    step_time_s: float  # first event to last: the pipelined forward/backward part of the step
    busy: dict[int, float]  # drawn rank -> share of step_time_s spent in compute (F, B, W)
    measured_bubble: float  # idle share over every rank (`idle_fraction`)
    theoretical_bubble: float  # the schedule's formula with free transfers (`schedule.bubble_fraction`)
    tp: int = 1
    dp: int = 1
    vpp: int = 1  # virtual stages (chunks) per rank, read off the events

    @property
    def drawn(self) -> list[int]:
        return list(self.busy)

    def layout(self) -> str:
        return f"p={self.stages}, " + (f"v={self.vpp}, " if self.vpp > 1 else "") + f"m={self.microbatches}"

    def title(self) -> str:
        return (f"pipeline timeline of step {self.step} ({self.schedule}, {self.layout()}): "
                f"{_duration(self.step_time_s)}, bubble {self.measured_bubble:.1%} measured vs "
                f"{self.theoretical_bubble:.1%} theoretical")

    def subtitle(self) -> str | None:
        """Which rank each row shows, when a stage has more than one (tp or dp > 1)."""
        if self.tp * self.dp == 1:
            return None
        ranks = ", ".join(map(str, self.drawn))
        return f"one rank per stage: ranks {ranks} (tp={self.tp}, dp={self.dp})"

    def as_dict(self) -> dict:
        return {"step": self.step, "schedule": self.schedule, "stages": self.stages,
                "microbatches": self.microbatches, "step_time_s": self.step_time_s,
                "busy_share": {f"rank {r}": b for r, b in self.busy.items()}, "drawn_ranks": self.drawn,
                "measured_bubble": self.measured_bubble, "theoretical_bubble": self.theoretical_bubble,
                "tp": self.tp, "dp": self.dp, "vpp": self.vpp}


# the idle share of each schedule's ideal step (`schedule.bubble_fraction`), for the log line
_FORMULAS = {"1f1b": "(p-1)/(m+p-1)", "gpipe": "(p-1)/(m+p-1)", "interleaved": "(p-1)/(v*m+p-1)",
             "zb-h1": "(p-1)/(3m+p-1) at tf=tB=tW"}


def summarize(events: Sequence[Event], step: int, bubble: Callable[[int, int], float], schedule: str = "1f1b",
              tp: int = 1, dp: int = 1) -> TimelineSummary:
    """The figures of `events` (one step, every rank, from `gather_events`); p, m and the
    chunks per rank are read off the events themselves (m counts distinct microbatches, so
    a microbatch through several chunks counts once), so a summary cannot disagree with
    what was drawn. `bubble` is the schedule's formula of (p, m), e.g.
    ``functools.partial(schedule.bubble_fraction, name="interleaved", vpp=2)``."""
    if not events:
        raise UserError("the timeline has no events to summarize; record a step with the timeline switched on")
    rows = drawn_ranks(events)
    t0, t1 = min(e.start for e in events), max(e.end for e in events)
    span_s = t1 - t0
    busy = {r: sum(e.duration for e in events if e.rank == r and e.cat in COMPUTE) for r in rows.values()}
    forwards = [e for e in events if e.rank == rows[min(rows)] and e.cat == "forward"]
    m = len({e.mb for e in forwards})
    return TimelineSummary(
        step=step, schedule=schedule, stages=len(rows), microbatches=m, step_time_s=span_s,
        busy={r: (b / span_s if span_s > 0 else 0.0) for r, b in busy.items()},
        measured_bubble=idle_fraction(events), theoretical_bubble=bubble(len(rows), m), tp=tp, dp=dp,
        vpp=len({e.chunk for e in forwards}) or 1,
    )


def _duration(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def write_timeline(events: Sequence[Event], run_dir: Path, step: int, bubble: Callable[[int, int], float],
                   schedule: str, tp: int, dp: int) -> str:
    """RUN_DIR/timeline.json and timeline.png (when matplotlib is there) with the figures;
    returns the one line a user is told: the files, the step, measured vs theoretical bubble."""
    summary = summarize(events, step, bubble, schedule, tp, dp)
    files = [str(write_chrome_trace(events, Path(run_dir) / "timeline.json", summary))]
    note = ""
    try:
        files.append(str(plot_gantt(events, Path(run_dir) / "timeline.png", summary=summary)))
    except UserError as err:  # matplotlib missing: the trace alone
        note = f" ({err})"
    return (f"pipeline timeline of step {summary.step}: {', '.join(files)}; {_duration(summary.step_time_s)}, "
            f"bubble {summary.measured_bubble:.1%} measured vs {summary.theoretical_bubble:.1%} theoretical "
            f"({_FORMULAS.get(schedule, 'its formula')}, {summary.layout()}){note}")


def chrome_trace(events: Iterable[Event], summary: TimelineSummary | None = None) -> dict:
    """The Chrome trace-event format: one process per stage, one thread per rank; the
    summary's figures go in `otherData`, which chrome://tracing shows as the metadata."""
    events = list(events)
    out: list[dict] = []
    for stage in sorted({e.stage for e in events}):
        out.append({"ph": "M", "name": "process_name", "pid": stage, "args": {"name": f"stage {stage}"}})
        out.append({"ph": "M", "name": "process_sort_index", "pid": stage, "args": {"sort_index": stage}})
    for rank, stage in sorted({(e.rank, e.stage) for e in events}):
        out.append({"ph": "M", "name": "thread_name", "pid": stage, "tid": rank, "args": {"name": f"rank {rank}"}})
    for e in events:  # ts, dur in microseconds; cname: chrome://tracing's colour, as in the PNG
        out.append({"ph": "X", "name": e.name, "cat": e.cat, "pid": e.stage, "tid": e.rank, "ts": e.start * 1e6,
                    "dur": max(e.duration, 0.0) * 1e6, "cname": _TRACE_COLOURS.get(e.cat, "generic_work"),
                    "args": {"microbatch": e.mb} if e.mb >= 0 else {}})
    trace: dict = {"traceEvents": out, "displayTimeUnit": "ms"}
    if summary is not None:
        trace["otherData"] = summary.as_dict()
    return trace


def write_chrome_trace(events: Iterable[Event], path: str | Path, summary: TimelineSummary | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(chrome_trace(events, summary)))
    return path


_COLOURS = {"forward": "#4c72b0", "backward": "#55a868", "weight": "#dd8452", "transfer": "#c0c0c0"}
_TRACE_COLOURS = {"forward": "thread_state_runnable", "backward": "thread_state_running",  # blue, green,
                  "weight": "thread_state_iowait", "transfer": "grey"}  # orange, grey: the PNG's colours


def plot_gantt(events: Iterable[Event], path: str | Path, title: str | None = None,
               summary: TimelineSummary | None = None) -> Path:
    """A PNG of stages (rows, stage 0 on top) against time; compute bars carry their
    microbatch number (``3.1``: chunk 1; odd chunks lighter), transfers are thin grey
    bars underneath, white space is the bubble.

    Ranks of one stage (tp, dp) share its row: only the lowest rank is drawn (a
    `summary` names them in a subtitle). With a summary the title carries the step, its
    time and the measured vs theoretical bubble, and each row its rank's busy share.
    """
    plt = _pyplot()
    events = _nonempty(events)
    fig, ax = plt.subplots(figsize=(12, 0.7 * len(drawn_ranks(events)) + 1.8))
    unit, scale = _unit(events)
    _draw(ax, events, scale, summary)
    ax.set_xlabel(f"time ({unit})")
    heading = title or (summary.title() if summary else f"pipeline timeline (idle {idle_fraction(events):.0%})")
    sub = summary.subtitle() if summary is not None else None
    ax.set_title(heading + (f"\n{sub}" if sub else ""), fontsize=10)
    return _save(plt, fig, ax, path)


def plot_gantts(panels: Sequence[tuple[str, Sequence[Event]]], path: str | Path) -> Path:
    """Several timelines, one titled panel each, stacked on one time axis: schedules side
    by side, so their bubbles compare at a glance."""
    plt = _pyplot()
    panels = [(title, _nonempty(events)) for title, events in panels]
    rows = [len(drawn_ranks(events)) for _, events in panels]
    fig, axes = plt.subplots(len(panels), 1, sharex=True, squeeze=False, height_ratios=rows,
                             figsize=(12, sum(0.45 * n + 0.6 for n in rows) + 0.6))
    unit, scale = _unit([e for _, events in panels for e in events])
    for ax, (title, events) in zip(axes[:, 0], panels):
        _draw(ax, events, scale)
        ax.set_title(title, fontsize=9)
    axes[-1, 0].set_xlabel(f"time ({unit})")
    return _save(plt, fig, axes[0, 0], path)


def _nonempty(events: Iterable[Event]) -> list[Event]:
    if not (events := list(events)):
        raise UserError("the timeline has no events to draw; record a step with the timeline switched on")
    return events


def _unit(events: Sequence[Event]) -> tuple[str, float]:  # the time axis: ms under 10 s
    return ("ms", 1e3) if max(e.end for e in events) < 10 else ("s", 1.0)


def _draw(ax: object, events: list[Event], scale: float, summary: TimelineSummary | None = None) -> None:
    """One timeline on `ax`: the lowest rank of each stage as a row, stage 0 on top."""
    rows = drawn_ranks(events)
    stages = list(rows)
    _bars(ax, [e for e in events if e.rank == rows[e.stage]], stages, scale)
    labels = [f"stage {s}" for s in stages]
    if summary is not None:
        labels = [f"stage {s} (rank {r})\nbusy {summary.busy.get(r, 0.0):.0%}" for s, r in rows.items()]
    ax.set_yticks(stages, labels, fontsize=8)
    ax.invert_yaxis()


def _save(plt: object, fig: object, legend_ax: object, path: str | Path) -> Path:
    """The colour legend right of `legend_ax`, then the PNG."""
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _COLOURS.values()]
    legend_ax.legend(handles, list(_COLOURS), loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _pyplot():  # noqa: ANN202 - the module is optional, so no annotation can name it
    """matplotlib.pyplot on the file-only Agg backend, imported only when a chart is drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never needs a display
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise UserError("drawing the pipeline timeline needs matplotlib; install it with pip install 'trident[plot]'") from err
    return plt


def _bars(ax: object, drawn: list[Event], stages: list[int], scale: float) -> None:
    """Compute bars (with microbatch numbers while readable) and thin transfer bars."""
    for cat, colour in _COLOURS.items():
        for stage in stages:
            for odd in (False, True):  # odd chunks lighter, so interleaved chunks tell apart
                spans = [(e.start * scale, e.duration * scale) for e in drawn
                         if e.stage == stage and e.cat == cat and (e.chunk % 2 == 1) == odd]
                if not spans:
                    continue
                if cat == "transfer":  # thin, under the compute bars
                    ax.broken_barh(spans, (stage + 0.25, 0.12), color=colour)
                else:
                    ax.broken_barh(spans, (stage - 0.3, 0.6), color=colour, alpha=0.55 if odd else 1.0,
                                   edgecolor="white", linewidth=0.5)
    if len(drawn) <= 1500:  # microbatch numbers, while they are still readable
        for e in drawn:
            if e.mb >= 0 and e.cat != "transfer":
                ax.text((e.start + e.duration / 2) * scale, e.stage, f"{e.mb}.{e.chunk}" if e.chunk else str(e.mb),
                        ha="center", va="center", fontsize=6, color="white")
