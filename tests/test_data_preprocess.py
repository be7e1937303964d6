"""`trident preprocess`: inputs of every kind, bad lines, empty documents, atomicity, workers."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from data_fixtures import *  # noqa: F401,F403

from trident.data.corpus import stdlib_root, stdlib_sources, write_stdlib_corpus
from trident.data.indexed import IndexedDataset
from trident.data.preprocess import preprocess
from trident.data.tokenizer import load_tokenizer
from trident.errors import UserError


def docs_of(prefix) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    return [ds.document(d).tolist() for d in range(ds.num_documents)]


def leftovers(folder) -> list[str]:
    return sorted(p for p in os.listdir(folder) if ".tmp" in p)


def test_jsonl_documents_eod_lists_and_empty(tmp_path, sp_model):
    tok = load_tokenizer(sp_model)
    rows = [
        {"text": "def a():\n    return 1\n"},
        {"text": ""},  # empty: skipped and counted
        {"text": ["first sentence.", "", "second one."]},  # a list: one sequence per non-empty string
        {"text": "   \n\t"},  # whitespace only: empty too
        {"text": "x = [1, 2, 3]", "meta": 5},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # a blank line is not a record
    stats = preprocess([str(src)], str(tmp_path / "out"), str(sp_model), append_eod=True, progress=False)
    assert (stats.documents, stats.sequences, stats.empty_documents, stats.bad_lines) == (3, 4, 2, 0)
    ds = IndexedDataset(tmp_path / "out")
    assert ds.dtype == np.uint16 and ds.num_documents == 3 and len(ds) == 4
    assert ds[0].tolist() == tok.encode(rows[0]["text"]) + [tok.eod_id]
    # Megatron's rule: EOD goes after the last sequence of a document only.
    assert ds[1].tolist() == tok.encode("first sentence.")
    assert ds[2].tolist() == tok.encode("second one.") + [tok.eod_id]
    assert ds[3].tolist() == tok.encode("x = [1, 2, 3]") + [tok.eod_id]
    assert stats.tokens == ds.num_tokens
    assert leftovers(tmp_path) == []


def test_text_gz_folders_globs_and_json_key(tmp_path, sp_model):
    tok = load_tokenizer(sp_model)
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("file b\nsecond line of b\n")
    (folder / "sub" / "a.py").write_text("print('a')\n")
    (folder / ".hidden").write_text("never read")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"content": "from gz"}) + "\n")
    (tmp_path / "lines.txt").write_text("line one\n\nline three\n")

    preprocess([str(folder), str(tmp_path / "*.jsonl.gz")], str(tmp_path / "o1"), str(sp_model),
               json_key="content", progress=False)
    # folder files sorted by path: b.txt, then sub/a.py; then the glob's gz file
    assert docs_of(tmp_path / "o1") == [
        tok.encode("file b\nsecond line of b\n"), tok.encode("print('a')\n"), tok.encode("from gz")
    ]
    stats = preprocess([str(tmp_path / "lines.txt")], str(tmp_path / "o2"), str(sp_model), text_per_line=True,
                       progress=False)
    assert docs_of(tmp_path / "o2") == [tok.encode("line one"), tok.encode("line three")]
    assert stats.empty_documents == 1


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"text": "ok"', "malformed JSON"),
        ('{"body": "no text key"}', "missing key 'text'"),
        ('{"text": 5}', "key 'text' holds int, not a string"),
        ('["a list"]', "expected a JSON object"),
    ],
)
def test_bad_line_stops_with_file_and_line(tmp_path, sp_model, line, reason):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "good"}\n{"text": "also good"}\n' + line + '\n{"text": "after"}\n')
    with pytest.raises(UserError, match=f"{src}:3: {reason}"):
        preprocess([str(src)], str(tmp_path / "out"), str(sp_model), progress=False)
    assert os.listdir(tmp_path) == ["bad.jsonl"]  # nothing written, no temporary files


def test_skip_bad_lines_counts_them(tmp_path, sp_model):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b'{"text": "good"}\n{oops\n{"text": "\xff\xfe"}\n{"other": 1}\n{"text": "end"}\n')
    stats = preprocess([str(src)], str(tmp_path / "out"), str(sp_model), skip_bad_lines=True, progress=False)
    assert (stats.documents, stats.bad_lines) == (2, 3)


def test_cli_bad_line_exits_2_and_keeps_previous_output(tmp_path, sp_model, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "hello"}\n')
    out = str(tmp_path / "out")
    assert run_cli(["preprocess", "--input", str(good), "--output-prefix", out, "--tokenizer", str(sp_model),
                    "--append-eod", "--quiet"]) == 0
    assert "1 documents" in capsys.readouterr().out
    before = (open(out + ".bin", "rb").read(), open(out + ".idx", "rb").read())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    assert run_cli(["preprocess", "--input", str(bad), "--output-prefix", out, "--tokenizer", str(sp_model),
                    "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: malformed JSON" in err and "--skip-bad-lines" in err and err.count("\n") == 1
    assert (open(out + ".bin", "rb").read(), open(out + ".idx", "rb").read()) == before
    assert leftovers(tmp_path) == []
    assert run_cli(["preprocess", "--input", str(tmp_path / "missing*.jsonl"), "--output-prefix", out,
                    "--tokenizer", str(sp_model)]) == 2
    assert "matches no files" in capsys.readouterr().err


def test_keyboard_interrupt_leaves_nothing_half_written(tmp_path, sp_model, stdlib_jsonl, monkeypatch):
    from trident.data import preprocess as pre

    calls = {"n": 0}
    real = pre._Encoder.encode_chunk

    def interrupted(self, chunk):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, chunk)

    monkeypatch.setattr(pre._Encoder, "encode_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        preprocess([str(stdlib_jsonl)], str(tmp_path / "out"), str(sp_model), progress=False, chunk_bytes=20_000)
    assert calls["n"] >= 3  # threads already encoding other chunks may finish theirs
    assert os.listdir(tmp_path) == []


SIGINT_RUN = """
import os, signal, sys

MOMENT = os.environ["SIGINT_AT"]


def interrupt():  # Ctrl-C in a terminal: SIGINT to every process of the group
    os.killpg(0, signal.SIGINT)


if __name__ == "__mp_main__" and MOMENT == "worker_starting":
    # in a spawned worker, before its initializer runs: where an unprotected worker dies
    try:
        os.close(os.open(os.environ["SIGINT_ONCE"], os.O_CREAT | os.O_EXCL))
        interrupt()
    except FileExistsError:
        pass

if __name__ == "__main__":
    import multiprocessing.context

    from trident.data import preprocess as pre
    from trident.tools.cli import main

    if MOMENT == "worker_exists":  # the first instant a worker process exists
        start = multiprocessing.context.SpawnProcess.start

        def start_then_interrupt(self):
            start(self)
            interrupt()

        multiprocessing.context.SpawnProcess.start = start_then_interrupt
    if MOMENT == "mid_run":  # workers busy, the first chunk written
        consume = pre._Consumer.__call__

        def consume_then_interrupt(self, result):
            consume(self, result)
            interrupt()

        pre._Consumer.__call__ = consume_then_interrupt
    sys.exit(main(sys.argv[1:]))
"""


def _group_alive(pgid: int) -> list[str]:
    import psutil

    alive = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(str(proc.pid))
        except (ProcessLookupError, psutil.Error):
            continue
    return alive


@pytest.mark.parametrize("moment", ["before_chunk", "worker_exists", "worker_starting", "mid_run"])
def test_sigint_to_process_group_with_workers(tmp_path, sp_model, moment):
    """Ctrl-C in a terminal reaches the parent and its workers, at any moment: before the
    first chunk, the instant a worker exists, inside a starting worker, mid-run. Each moment
    is reached by the run itself (no sleeps), so the test is deterministic under any load.
    The run ends with one sentence and exit 130, no output file and no process left."""
    data = tmp_path / "data"
    data.mkdir()
    src = data / "in.jsonl"
    if moment == "before_chunk":
        os.mkfifo(src)  # the run blocks reading it: no chunk, no worker yet
    else:
        src.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n" * 20}) + "\n"
                               for i in range(3000)))  # ~1.5 MB: several 256 KB chunks
    script = tmp_path / "run.py"
    script.write_text(SIGINT_RUN)
    env = dict(os.environ, SIGINT_AT=moment, SIGINT_ONCE=str(tmp_path / "once"), TQDM_DISABLE="1")
    cmd = [sys.executable, str(script), "preprocess", "--input", str(src), "--output-prefix", str(data / "out"),
           "--tokenizer", str(sp_model), "--workers", "2", "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        if moment == "before_chunk":
            with open(src, "w"):  # returns once the run has opened its input; held open until it exits
                os.killpg(proc.pid, signal.SIGINT)
                out, err = proc.communicate(timeout=120)
        else:
            out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"the run hung after Ctrl-C at {moment}: {err[-4000:]}")
    assert (proc.returncode, err.strip()) == (130, "trident preprocess: interrupted"), (out, err[-4000:])
    assert sorted(os.listdir(data)) == ["in.jsonl"]  # nothing half-written
    assert _group_alive(proc.pid) == []  # every worker and the resource tracker are gone


def test_workers_output_identical_to_one_worker(tmp_path, sp_model, stdlib_jsonl):
    kwargs = dict(append_eod=True, progress=False, chunk_bytes=30_000)  # many chunks in flight
    s1 = preprocess([str(stdlib_jsonl)], str(tmp_path / "w1"), str(sp_model), workers=1, **kwargs)
    s2 = preprocess([str(stdlib_jsonl)], str(tmp_path / "w2"), str(sp_model), workers=2, **kwargs)
    assert s1.documents > 10 and (s1.documents, s1.tokens) == (s2.documents, s2.tokens)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()
    assert "docs/s" in s2.summary() and "MB/s" in s2.summary()


REAP_CHECK = """
import multiprocessing, os, sys
from trident.data.preprocess import preprocess

def children_of(pid):
    found = []
    for name in os.listdir("/proc"):
        try:
            stat = open(f"/proc/{name}/stat").read()
        except (OSError, ValueError):
            continue  # not a process, or it ended while we looked
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
        if int(ppid) == pid:
            found.append(f"{name} {state}")
    return found

if __name__ == "__main__":
    try:
        preprocess([sys.argv[1]], sys.argv[2], sys.argv[3], workers=int(sys.argv[4]), progress=False, chunk_bytes=5000)
    except Exception as err:
        print("raised", type(err).__name__)
    print("children", multiprocessing.active_children(), children_of(os.getpid()))
"""


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("bad_input", [False, True])
def test_every_process_is_reaped(tmp_path, sp_model, stdlib_jsonl, workers, bad_input):
    """No worker, resource tracker or zombie child is left once preprocess returns (or raises):
    an unreaped child outlives the command as a zombie under an init that does not reap."""
    src = stdlib_jsonl
    if bad_input:
        src = tmp_path / "bad.jsonl"
        src.write_text(stdlib_jsonl.read_text() + "not json\n")
    args = [str(src), str(tmp_path / "out"), str(sp_model), str(workers)]
    done = subprocess.run([sys.executable, "-c", REAP_CHECK, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert ("raised UserError" in done.stdout) == bad_input
    assert "children [] []" in done.stdout, done.stdout


def test_workers_must_be_positive(tmp_path, sp_model, stdlib_jsonl):
    with pytest.raises(UserError, match="--workers 0"):
        preprocess([str(stdlib_jsonl)], str(tmp_path / "o"), str(sp_model), workers=0)


def test_stdlib_corpus_is_deterministic_and_excludes_site_packages(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    stats = write_stdlib_corpus(a, include=["json/*.py", "csv.py"])
    write_stdlib_corpus(b, include=["json/*.py", "csv.py"])
    assert a.read_bytes() == b.read_bytes()
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    paths = [r["path"] for r in rows]
    assert paths == sorted(paths) and "csv.py" in paths and "json/__init__.py" in paths
    assert stats.files == len(rows)
    assert rows[paths.index("csv.py")]["text"] == (stdlib_root() / "csv.py").read_text(encoding="utf-8")
    everything = stdlib_sources()
    assert len(everything) > 500
    assert not any(p.parts[0] in ("site-packages", "dist-packages") for p in everything)


def test_cli_corpus_and_merge(tmp_path, sp_model, capsys):
    out = tmp_path / "c.jsonl"
    assert run_cli(["corpus", "stdlib", "--output", str(out), "--include", "json/*.py", "--limit", "2"]) == 0
    assert len(out.read_text().splitlines()) == 2
    for name in ("p1", "p2"):
        assert run_cli(["preprocess", "--input", str(out), "--output-prefix", str(tmp_path / name),
                        "--tokenizer", str(sp_model), "--quiet"]) == 0
    assert run_cli(["preprocess", "--merge", str(tmp_path / "p1"), str(tmp_path / "p2"),
                    "--output-prefix", str(tmp_path / "m")]) == 0
    assert docs_of(tmp_path / "m") == docs_of(tmp_path / "p1") * 2
    assert run_cli(["corpus", "info", str(tmp_path / "m")]) == 0
    assert "4 documents" in capsys.readouterr().out
