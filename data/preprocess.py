"""Corpus files -> one Megatron-compatible ``PREFIX.bin`` / ``PREFIX.idx`` pair.

The main process reads raw records (cheap) and groups them into chunks of about 256 KB;
an executor parses JSON and tokenises whole chunks with the tokenizer's batch path; the
main process writes the results in chunk order. Chunk boundaries depend only on the
input, and results are written in submission order, so the output is byte-identical for
any worker count. At most ``4 x executors`` chunks are in flight, so memory stays flat
whatever the corpus size.

Tokenisation is the ceiling (DESIGN.md: ~5 MB/s per thread), so everything else overlaps
with it. With one worker the executor is a pool of one thread per core in this process
(the tokenizers release the GIL), each encoding its own chunk single-threaded: one batch
call per chunk on the tokenizer's own thread pool would wait for the chunk's longest
document at every chunk boundary, and parsing would not overlap encoding. With N > 1
workers the executor is N spawned processes, all reaped (resource tracker included)
before ``preprocess`` returns, on errors and Ctrl-C too.

Ctrl-C in a terminal signals the whole process group, workers included, at any moment --
even while a worker is still starting, before any code of ours runs in it. A worker that
died of it would leave the executor waiting for its result; so every worker is started
with SIGINT blocked (the mask is inherited through fork and exec), and its initializer
ignores SIGINT before unblocking it. The parent alone turns Ctrl-C into KeyboardInterrupt,
and only where the executor's state is whole (`_sigint_deferred`).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from typing import Callable, Iterator, Sequence

import numpy as np

from trident.data.indexed import IndexedDatasetWriter, split_prefix, token_dtype_for_vocab
from trident.data.sources import BadRecord, Record, expand_inputs, iter_records, parse_record
from trident.data.tokenizer import load_tokenizer
from trident.errors import UserError

CHUNK_BYTES = 1 << 18  # small enough that idle threads find work, large enough to amortise a call
IN_FLIGHT_PER_EXECUTOR = 4
CHUNK_RECORDS = 4096


@dataclass
class ChunkResult:
    """What a worker sends back for one chunk; tokens are already in the output dtype."""

    tokens: np.ndarray  # [sum(sequence_lengths)]
    sequence_lengths: np.ndarray  # [num_sequences] int32
    sequences_per_document: np.ndarray  # [num_documents] int32
    empty_documents: int = 0
    bad_lines: list[tuple[str, int, str]] = field(default_factory=list)
    text_bytes: int = 0
    input_bytes: int = 0


@dataclass
class PreprocessStats:
    """The summary of one run, printed by the CLI and returned to library callers."""

    output_prefix: str
    documents: int = 0
    sequences: int = 0
    tokens: int = 0
    text_bytes: int = 0
    empty_documents: int = 0
    bad_lines: int = 0
    seconds: float = 0.0
    workers: int = 1

    def summary(self) -> str:
        secs = max(self.seconds, 1e-9)
        return (
            f"wrote {self.output_prefix}.bin/.idx: {self.documents} documents, {self.tokens} tokens "
            f"in {self.seconds:.2f} s ({self.documents / secs:.0f} docs/s, {self.text_bytes / secs / 1e6:.2f} MB/s, "
            f"{self.workers} workers); skipped {self.empty_documents} empty documents and {self.bad_lines} bad lines"
        )


class _Encoder:
    """Parses and tokenises chunks; one per worker process (or one in process)."""

    def __init__(
        self,
        tokenizer_path: str,
        json_key: str,
        append_eod: bool,
        skip_bad_lines: bool,
        num_threads: int,
        eod_token: str | None = None,
    ) -> None:
        self.tokenizer = load_tokenizer(tokenizer_path, eod_token=eod_token)
        self.dtype = token_dtype_for_vocab(self.tokenizer.vocab_size)
        self.json_key = json_key
        self.append_eod = append_eod
        self.skip_bad_lines = skip_bad_lines
        self.num_threads = num_threads
        if append_eod and self.tokenizer.eod_id is None:
            raise UserError(f"--append-eod needs an end-of-document token, and {tokenizer_path} has none.")

    def encode_chunk(self, chunk: list[Record]) -> ChunkResult:
        texts: list[str] = []
        per_doc: list[int] = []
        result = ChunkResult(np.empty(0, self.dtype), np.empty(0, np.int32), np.empty(0, np.int32))
        for record in chunk:
            result.input_bytes += record.disk_bytes
            try:
                parts = parse_record(record, self.json_key)
            except BadRecord as err:
                result.bad_lines.append((record.path, record.line, str(err)))
                if not self.skip_bad_lines:
                    break  # the main process stops at this line; the rest of the chunk is moot
                continue
            # An empty document is one with no visible text; empty parts of a list are dropped.
            parts = [p for p in parts if p.strip()]
            if not parts:
                result.empty_documents += 1
                continue
            texts.extend(parts)
            per_doc.append(len(parts))
            result.text_bytes += sum(len(p.encode("utf-8")) for p in parts)
        if not texts:
            return result
        ids = self.tokenizer.encode_batch(texts, num_threads=self.num_threads)
        if self.append_eod:
            # Megatron appends EOD to the last sequence of each document.
            ends = np.cumsum(per_doc) - 1
            for i in ends:
                ids[i].append(self.tokenizer.eod_id)
        lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
        total = int(lengths.sum(dtype=np.int64))
        if total:
            tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=total)  # [total]
            if int(tokens.max()) > np.iinfo(self.dtype).max:
                raise UserError(f"token id {int(tokens.max())} does not fit {self.dtype}.")
            result.tokens = tokens.astype(self.dtype)
        result.sequence_lengths = lengths
        result.sequences_per_document = np.asarray(per_doc, dtype=np.int32)
        return result


_WORKER: _Encoder | None = None


def _init_worker(*args: object) -> None:
    # Ctrl-C goes to the whole process group; the parent handles it and shuts the pool down,
    # so workers ignore it instead of dying mid-result and leaving the pool hung. SIGINT is
    # blocked since the worker was spawned (`_sigint_deferred`): ignoring it first discards
    # one that arrived during start-up, then unblocking is safe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    global _WORKER
    _WORKER = _Encoder(*args)  # type: ignore[arg-type]


def _encode_in_worker(chunk: list[Record]) -> ChunkResult:
    assert _WORKER is not None
    return _WORKER.encode_chunk(chunk)


def iter_chunks(records: Iterator[Record], chunk_bytes: int = CHUNK_BYTES) -> Iterator[list[Record]]:
    """Group records into chunks by size; depends only on the input, never on the worker count."""
    chunk: list[Record] = []
    size = 0
    for record in records:
        chunk.append(record)
        size += len(record.raw)
        if size >= chunk_bytes or len(chunk) >= CHUNK_RECORDS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def usable_cores() -> int:
    """Cores this process may run on (a cpuset or taskset can be fewer than the machine's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C for the span of the block, then deliver it.

    Around `submit` (which spawns workers on demand) and `shutdown`: a process spawned here
    inherits SIGINT blocked, and a KeyboardInterrupt never lands inside the executor's
    bookkeeping (a worker started but not yet recorded would take a shutdown sentinel
    meant for another, and shutdown would wait forever). The block never waits on input,
    so Ctrl-C is held for microseconds (or one chunk's encoding, at shutdown).
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread runs Python signal handlers; it spawns nothing here
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)  # one that waited is recorded here
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
        if received:
            signal.raise_signal(signal.SIGINT)  # now, to the handler that was in place


@contextlib.contextmanager
def _executor(workers: int, encoder: _Encoder, encoder_args: tuple) -> Iterator[tuple[Executor, Callable]]:
    """The executor that encodes chunks, and the function it runs; shut down and joined on exit.

    Exiting (normally, on an error or on Ctrl-C) cancels queued chunks, waits for running
    ones (< 1 chunk each) and joins every thread or process, so nothing outlives the call.
    """
    if workers == 1:
        pool: Executor = ThreadPoolExecutor(usable_cores(), thread_name_prefix="preprocess")
        try:
            yield pool, encoder.encode_chunk
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return
    # spawn: the parent may hold threads (tqdm, torch) that fork would copy mid-lock.
    # An executor (not mp.Pool) fails with BrokenProcessPool if a worker dies,
    # where a Pool would respawn it forever and hang.
    tracker_was_running = _resource_tracker_pid() is not None
    pool = ProcessPoolExecutor(
        workers, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=encoder_args
    )
    try:
        yield pool, _encode_in_worker
    finally:
        with _sigint_deferred():  # a second Ctrl-C must not abandon the workers mid-join
            pool.shutdown(wait=True, cancel_futures=True)
            del pool
            if not tracker_was_running:
                _stop_resource_tracker()


def _resource_tracker_pid() -> int | None:
    return getattr(resource_tracker._resource_tracker, "_pid", None)


def _stop_resource_tracker() -> None:
    """Stop and reap the resource tracker that spawning the workers started.

    Spawn starts a tracker process that multiprocessing never waits for: it outlives the
    caller and, once its parent has exited, stays a zombie under an init that does not
    reap (containers, microVMs). Our semaphores must be freed first (gc: the executor's
    queues sit in reference cycles), or the tracker would report them as leaked.
    """
    gc.collect()
    stop = getattr(resource_tracker._resource_tracker, "_stop", None)
    if stop is not None:
        stop()


def _run_chunks(chunks: Iterator[list[Record]], pool: Executor, encode: Callable, window: int,
                consume: Callable[[ChunkResult], None]) -> None:
    """Encode ``chunks`` on ``pool`` with at most ``window`` in flight; consume results in order."""
    pending: deque[Future] = deque()
    for chunk in chunks:
        with _sigint_deferred():  # submit may spawn a worker
            pending.append(pool.submit(encode, chunk))
        if len(pending) >= window:
            consume(pending.popleft().result())
    while pending:
        consume(pending.popleft().result())


class _Consumer:
    """Writes chunk results in order, counts them and advances the progress bar."""

    def __init__(self, writer: IndexedDatasetWriter, stats: PreprocessStats, skip_bad_lines: bool,
                 bar: object | None, start: float) -> None:
        self.writer, self.stats, self.skip_bad_lines, self.bar, self.start = writer, stats, skip_bad_lines, bar, start

    def __call__(self, result: ChunkResult) -> None:
        stats = self.stats
        if result.bad_lines:
            stats.bad_lines += len(result.bad_lines)
            if not self.skip_bad_lines:
                path, line, reason = result.bad_lines[0]
                raise UserError(f"{path}:{line}: {reason}; pass --skip-bad-lines to skip and count such lines.")
        self.writer.add_documents(result.tokens, result.sequence_lengths, result.sequences_per_document)
        stats.documents += len(result.sequences_per_document)
        stats.sequences += len(result.sequence_lengths)
        stats.tokens += int(result.tokens.size)
        stats.text_bytes += result.text_bytes
        stats.empty_documents += result.empty_documents
        if self.bar is not None:
            secs = max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(  # type: ignore[attr-defined]
                f"{stats.documents / secs:.0f} docs/s, {stats.text_bytes / secs / 1e6:.2f} MB/s text", refresh=False
            )
            self.bar.update(result.input_bytes)  # type: ignore[attr-defined]


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer: str,
    json_key: str = "text",
    workers: int = 1,
    append_eod: bool = False,
    skip_bad_lines: bool = False,
    text_per_line: bool = False,
    eod_token: str | None = None,
    progress: bool = True,
    chunk_bytes: int = CHUNK_BYTES,
) -> PreprocessStats:
    """Tokenise ``inputs`` into ``output_prefix.bin/.idx``; see the module docstring."""
    if workers < 1:
        raise UserError(f"--workers {workers} must be at least 1.")
    files = expand_inputs(inputs)
    prefix = split_prefix(output_prefix)
    total_bytes = sum(os.path.getsize(p) for p in files if os.path.isfile(p))
    encoder_args = (tokenizer, json_key, append_eod, skip_bad_lines, 1, eod_token)
    # Validate the tokenizer (and --append-eod against it) here, before any process starts;
    # one thread per chunk: the in-process pool supplies the parallelism.
    local = _Encoder(*encoder_args)  # type: ignore[arg-type]
    stats = PreprocessStats(output_prefix=prefix, workers=workers)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", file=sys.stderr, smoothing=0.1)
    start = time.perf_counter()
    chunks = iter_chunks(iter_records(files, text_per_line=text_per_line), chunk_bytes)
    try:
        with IndexedDatasetWriter(prefix, local.dtype) as writer, _executor(workers, local, encoder_args) as (pool, fn):
            consume = _Consumer(writer, stats, skip_bad_lines, bar, start)
            window = IN_FLIGHT_PER_EXECUTOR * (workers if workers > 1 else usable_cores())
            _run_chunks(chunks, pool, fn, window, consume)
    finally:
        if bar is not None:
            bar.close()
    stats.seconds = time.perf_counter() - start
    return stats
