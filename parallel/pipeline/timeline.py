"""What each pipeline rank did when: events, a Chrome trace, and a PNG Gantt chart.

With a timeline switched on, the executor wraps every forward, backward and transfer of
a step in `Timeline.span`; `gather_events` brings every rank's events to one place on a
shared time axis; `chrome_trace` / `write_chrome_trace` produce a file for
chrome://tracing or https://ui.perfetto.dev, and `plot_gantt` draws stages x time with
matplotlib (an optional extra, imported only here and only when asked), so the bubble of
a schedule is something a user can see rather than compute.

The process-free schedule simulator (`parallel.pipeline.schedule.simulate`) produces the same
`Event`s, so a planned schedule and a measured one are drawn by the same code.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from trident.errors import UserError

CATEGORIES = ("forward", "backward", "transfer")


@dataclass(frozen=True)
class Event:
    """One interval on one rank. Times are seconds on the rank's clock until
    `gather_events` moves them onto a shared axis that starts at 0."""

    stage: int  # pipeline stage (the row of the Gantt chart)
    rank: int  # global rank (a thread of the stage's row in the Chrome trace)
    name: str  # "F3", "B3", "send act 3 + recv grad 1", ...
    cat: str  # forward | backward | transfer
    start: float
    end: float
    mb: int = -1  # microbatch, -1 for events that are not one microbatch's compute

    @property
    def duration(self) -> float:
        return self.end - self.start


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
    return sorted(
        (Event(e.stage, e.rank, e.name, e.cat, e.start - t0, e.end - t0, e.mb) for e in events),
        key=lambda e: (e.stage, e.rank, e.start),
    )


def idle_fraction(events: Iterable[Event]) -> float:
    """Share of stage-time spent outside forward/backward compute, over the span of the
    events: the measured bubble (transfers and waiting both count as idle)."""
    events = list(events)
    if not events:
        return 0.0
    t0, t1 = min(e.start for e in events), max(e.end for e in events)
    rows = {(e.stage, e.rank) for e in events}
    busy = sum(e.duration for e in events if e.cat in ("forward", "backward"))
    total = (t1 - t0) * len(rows)
    return 1.0 - busy / total if total > 0 else 0.0


def chrome_trace(events: Iterable[Event]) -> dict:
    """The Chrome trace-event format: one process per stage, one thread per rank."""
    events = list(events)
    out: list[dict] = []
    for stage in sorted({e.stage for e in events}):
        out.append({"ph": "M", "name": "process_name", "pid": stage, "args": {"name": f"stage {stage}"}})
        out.append({"ph": "M", "name": "process_sort_index", "pid": stage, "args": {"sort_index": stage}})
    for rank, stage in sorted({(e.rank, e.stage) for e in events}):
        out.append({"ph": "M", "name": "thread_name", "pid": stage, "tid": rank, "args": {"name": f"rank {rank}"}})
    for e in events:
        out.append(
            {
                "ph": "X",
                "name": e.name,
                "cat": e.cat,
                "pid": e.stage,
                "tid": e.rank,
                "ts": e.start * 1e6,  # microseconds
                "dur": max(e.duration, 0.0) * 1e6,
                "args": {"microbatch": e.mb} if e.mb >= 0 else {},
            }
        )
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def write_chrome_trace(events: Iterable[Event], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(chrome_trace(events)))
    return path


_COLOURS = {"forward": "#4c72b0", "backward": "#55a868", "transfer": "#c0c0c0"}


def plot_gantt(events: Iterable[Event], path: str | Path, title: str | None = None) -> Path:
    """A PNG of stages (rows, stage 0 on top) against time; compute bars carry their
    microbatch number, transfers are thin grey bars underneath, white space is the bubble.

    Ranks of one stage (tp, dp) share its row: they run the same schedule in lockstep.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never needs a display
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise UserError("drawing the pipeline timeline needs matplotlib; install it with pip install 'trident[plot]'") from err

    events = list(events)
    stages = sorted({e.stage for e in events})
    if not events:
        raise UserError("the timeline has no events to draw; record a step with the timeline switched on")
    unit, scale = ("ms", 1e3) if max(e.end for e in events) < 10 else ("s", 1.0)
    fig, ax = plt.subplots(figsize=(12, 0.7 * len(stages) + 1.5))
    # one rank per stage is drawn: tp/dp replicas run the same schedule and would overprint
    first_rank: dict[int, int] = {}
    for e in events:
        first_rank[e.stage] = min(first_rank.get(e.stage, e.rank), e.rank)
    drawn = [e for e in events if e.rank == first_rank[e.stage]]
    for cat, colour in _COLOURS.items():
        for stage in stages:
            spans = [(e.start * scale, e.duration * scale) for e in drawn if e.stage == stage and e.cat == cat]
            if not spans:
                continue
            if cat == "transfer":  # thin, under the compute bars
                ax.broken_barh(spans, (stage + 0.25, 0.12), color=colour)
            else:
                ax.broken_barh(spans, (stage - 0.3, 0.6), color=colour, edgecolor="white", linewidth=0.5)
    if len(drawn) <= 1500:  # microbatch numbers, while they are still readable
        for e in drawn:
            if e.mb >= 0 and e.cat != "transfer":
                ax.text((e.start + e.duration / 2) * scale, e.stage, str(e.mb), ha="center", va="center",
                        fontsize=6, color="white")
    ax.set_yticks(stages, [f"stage {s}" for s in stages])
    ax.invert_yaxis()
    ax.set_xlabel(f"time ({unit})")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _COLOURS.values()]
    ax.legend(handles, list(_COLOURS), loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7)
    ax.set_title(title or f"pipeline timeline (idle {idle_fraction(events):.0%})")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
