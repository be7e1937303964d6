"""The stall watchdog: a rank that stops (SIGSTOP) or hangs mid-step ends a `trident train`
job with exit status 1 and one sentence naming the rank, its host, step and phase -- no
gloo traceback, no wait for the 600 s collective timeout. Also, without processes: the
heartbeat's round trip through a real c10d store, who is named (`judge`), the bounded set
each rank watches, one reporter per job, and the config rule stall_timeout_s < timeout_s.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from cli_helpers import CONFIG, TIMEOUT, TINY, losses

from trident.errors import UserError
from trident.parallel.heartbeat import Heartbeat, read_heartbeats
from trident.parallel.pipeline.p2p import PeerExchange
from trident.parallel.pipeline.schedule import Exchange, Transfer
from trident.parallel.topology import Layout, Topology
from trident.training import watchdog as wd
from trident.training.config import load_config


@pytest.fixture
def store() -> dist.Store:
    server = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=30))
    return dist.PrefixStore("trident/attempt_0", server)


def test_heartbeat_round_trip_through_the_store(store):
    hb = Heartbeat()
    assert read_heartbeats(store, [0, 1]) == {}  # nobody has published: absent, not a blocking get
    hb.begin_step(3)
    hb.phase("p2p", PeerExchange(Exchange((Transfer("send", "act", "next", 0), Transfer("recv", "grad", "next", 0))),
                                 None, 1))
    hb.publish(store, rank=1, host="h1", pid=42)
    got = read_heartbeats(store, [0, 1])
    assert list(got) == [1]
    rec = got[1]
    assert (rec["rank"], rec["host"], rec["pid"], rec["step"], rec["seq"]) == (1, "h1", 42, 3, 1)
    assert rec["phase"] == "p2p send act 0 to rank 1 + recv grad 0 from rank 1"
    assert (rec["slow"], rec["armed"], rec["done"]) == (False, False, False)  # a process's first step is not judged
    assert 0 <= rec["in_phase_s"] < 60
    hb.begin_step(4)
    hb.phase("checkpoint save", slow=True)
    hb.publish(store, rank=1, host="h1", pid=42)
    rec = read_heartbeats(store, [1])[1]
    assert (rec["step"], rec["phase"], rec["slow"], rec["armed"], rec["seq"]) == (4, "checkpoint save", True, True, 2)


def _peer(seen_at: float, phase_s: float = 0.0, armed: bool = True, slow: bool = False, done: bool = False,
          rank: int = 0, waiting: bool = True) -> wd.Peer:
    record = {"rank": rank, "host": f"h{rank}", "pid": 100 + rank, "step": 7, "phase": f"phase of {rank}",
              "in_phase_s": phase_s, "slow": slow, "waiting": waiting, "armed": armed, "seq": 1, "done": done}
    return wd.Peer(seen_at=seen_at, record=record)


def test_judge_names_the_silent_rank_first_then_the_busy_one():
    now, limit = 1000.0, 120.0
    healthy = {0: _peer(now, 1.0), 1: _peer(now - 3, 2.0, rank=1)}
    assert wd.judge(healthy, now, limit) is None
    # rank 1 went quiet 70 s ago; rank 0 has waited for it in a collective for 121 s
    waiting = {0: _peer(now, 121.0), 1: _peer(now - 70, 5.0, rank=1)}
    stall = wd.judge(waiting, now, limit)
    assert (stall.rank, stall.stalled_s, stall.silent_s) == (1, 75.0, 70.0)
    # everyone alive: rank 1 has been busy with its own work (not waiting) while rank 0 waits
    hung = {0: _peer(now, 121.0), 1: _peer(now - 1, 70.0, rank=1, waiting=False), 2: _peer(now, 1.0, rank=2)}
    stall = wd.judge(hung, now, limit)
    assert (stall.rank, stall.stalled_s, stall.silent_s) == (1, 71.0, None)
    # all wait on peers: give a rank that sees the culprit time, then name the longest waiter
    waits = {0: _peer(now, 121.0), 1: _peer(now, 130.0, rank=1), 2: _peer(now, 10.0, rank=2, waiting=False)}
    assert wd.judge(waits, now, limit) is None
    later = {0: _peer(now, 172.0), 1: _peer(now, 181.0, rank=1), 2: _peer(now, 0.5, rank=2, waiting=False)}
    assert (wd.judge(later, now, limit).rank, wd.judge(later, now, limit).stalled_s) == (1, 181.0)
    # silent beyond the limit: named in any phase, even a slow one
    stopped = {0: _peer(now, 3.0), 1: _peer(now - 121, 1.0, slow=True, rank=1)}
    assert wd.judge(stopped, now, limit).rank == 1
    # not judged: a slow phase (checkpoint save), a process's first step, a rank that has left
    assert wd.judge({0: _peer(now, 500.0, slow=True), 1: _peer(now, 500.0, slow=True, rank=1)}, now, limit) is None
    assert wd.judge({0: _peer(now, 500.0, armed=False)}, now, limit) is None
    assert wd.judge({0: _peer(now, 1.0), 1: _peer(now - 500, done=True, rank=1)}, now, limit) is None
    never = {0: _peer(now, 1.0), 1: wd.Peer(seen_at=now - 121)}
    assert wd.stall_sentence(wd.judge(never, now, limit), limit).startswith(
        "rank 1 stalled before its first heartbeat: no heartbeat for 121 s (the process is stopped")


def test_the_sentence():
    stall = wd.Stall(rank=3, stalled_s=121.4, silent_s=None, record=_peer(0.0, rank=3).record)
    assert wd.stall_sentence(stall, 120.0) == (
        "rank 3 on host h3 (pid 103) stalled for 121 s at step 7 in phase 'phase of 3': it is alive, waiting on "
        "peers that look alive too (a hung or mismatched collective); the job stops with exit status 1 "
        "(parallel.stall_timeout_s=120; raise it if this phase can take longer).")


def test_each_rank_watches_a_bounded_set_and_every_rank_is_watched():
    layout = Layout(tp=8, pp=4, dp=32)  # 1,024 ranks
    watchers: dict[int, int] = {}
    for rank in range(layout.world):
        mine = wd.watched_ranks(layout, rank)
        assert 1 <= len(mine) <= 6 and rank not in mine  # tp, dp, pp rings: two neighbours each
        for r in mine:
            watchers[r] = watchers.get(r, 0) + 1
    assert sorted(watchers) == list(range(layout.world))
    assert wd.watched_ranks(Layout(tp=1, pp=2, dp=1), 0) == [1]
    assert wd.watched_ranks(Layout(tp=2, pp=2, dp=2, cp=2), 0) == [1, 2, 4, 8]


def test_a_watchdog_sees_a_silent_peer_and_one_rank_reports(store, tmp_path, monkeypatch):
    """Two watchdogs on one store, driven by hand (no threads): rank 1 stops publishing,
    rank 0 names it; both try to report, the store lets one through."""
    dogs = [wd.Watchdog(Topology(layout=Layout(1, 2, 1), rank=r, device=torch.device("cpu"), store=store), 5.0)
            for r in (0, 1)]
    for dog in dogs:
        dog.store.compare_set(wd.REPORT_KEY, "", "")
        dog.hb.begin_step(1)
        dog.hb.begin_step(2)
        dog.publish()
    dogs[1].hb.phase("forward mb", 0)
    dogs[1].publish()
    t0 = time.monotonic()
    dogs[0].peers = {1: wd.Peer(seen_at=t0)}
    assert dogs[0].check(t0) is None and dogs[0].peers[1].record["phase"] == "forward mb 0"
    stall = dogs[0].check(t0 + 6.0)  # nothing new from rank 1 for 6 s
    assert (stall.rank, stall.silent_s, stall.record["host"]) == (1, pytest.approx(6.0), socket.gethostname())
    exits: list[int] = []
    monkeypatch.setattr(wd, "_exit", exits.append)
    monkeypatch.setenv(wd.ERROR_DIR_ENV, str(tmp_path))
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    assert not dogs[1].reported()
    dogs[0].report(stall)
    dogs[1].report(wd.Stall(0, 6.0, 6.0, None))  # a second verdict loses: the file keeps the first
    assert exits == [1, 1] and dogs[1].reported()
    assert (tmp_path / wd.STALL_FILE).read_text() == wd.stall_sentence(stall, 5.0)


@pytest.mark.parametrize("value, ok", [(0, True), (30, True), (600, False), (-1, False)])
def test_stall_timeout_must_be_below_the_collective_timeout(value, ok):
    overrides = [f"parallel.stall_timeout_s={value}"]
    if ok:
        assert load_config(None, overrides).parallel.stall_timeout_s == value
        return
    with pytest.raises(UserError) as err:
        load_config(None, overrides)
    assert str(err.value) == (
        f"parallel.stall_timeout_s={value} must be 0 (off) or below parallel.timeout_s=600 (> 0), "
        "so a stalled rank is named before its peers' collectives time out")
    assert load_config(None, []).parallel.stall_timeout_s == 120


def _stalled_run(data_dir: Path, tmp_path: Path, action: str) -> tuple[subprocess.CompletedProcess, str]:
    """2 pipeline stages, 5 s stall timeout; rank 1 stalls in its first forward of step 3."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", TMPDIR=str(tmp_path),
               **{wd.TEST_STALL_ENV: f"1:3:{action}:forward mb 0"})
    cmd = [sys.executable, "-m", "trident", "train", "--config", str(CONFIG), "--nproc", "2", "--pp", "2",
           "--run-dir", str(tmp_path / "run"), *TINY, "train.steps=50", "parallel.stall_timeout_s=5",
           f"data.work_dir={data_dir}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        if action == "stop":
            _kill_when_named(tmp_path, proc)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), out + err


def _kill_when_named(tmp_path: Path, proc: subprocess.Popen) -> None:
    """torch's agent SIGKILLs a rank that ignores its SIGTERM after 30 s, and a stopped
    process cannot act on one; to stay lean the test does it once the watchdog has named
    the rank (and checks that it was indeed stopped: state T)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        named = list(tmp_path.glob(f"trident-ranks-*/{wd.STALL_FILE}"))
        if named:
            pid = int(re.search(r"\(pid (\d+)\)", named[0].read_text()).group(1))
            assert Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.2)


@pytest.mark.parametrize("action, why", [
    ("stop", r"no heartbeat for \d+ s \(the process is stopped, dead or cut off from the network\)"),
    ("hang", r"it is alive but has not finished that phase \(a hang or deadlock in this rank's own work\)"),
])
def test_a_stalled_rank_ends_the_job_with_one_sentence(data_dir, tmp_path, action, why):
    proc, output = _stalled_run(data_dir, tmp_path, action)
    assert proc.returncode == 1, output[-4000:]
    sentence = (rf"trident train: error: rank 1 on host {re.escape(socket.gethostname())} \(pid \d+\) stalled for "
                rf"\d+ s at step 3 in phase 'forward mb 0': {why}; the job stops with exit status 1 "
                r"\(parallel.stall_timeout_s=5; raise it if this phase can take longer\)\.")
    assert re.fullmatch(sentence, proc.stderr.strip()), output[-4000:]  # the sentence, and nothing else
    assert "Traceback" not in output and output.count("stalled for") == 1
    assert len(losses(tmp_path / "run")) == 2  # steps 1 and 2 ran; step 3 stalled
