"""Corpus files -> one Megatron-compatible ``PREFIX.bin`` / ``PREFIX.idx`` pair.

The main process reads raw records (cheap) and groups them into chunks of about a
megabyte; workers parse JSON and tokenise a whole chunk with the tokenizer's batch path;
the main process writes the results in chunk order. Chunk boundaries depend only on the
input, and results are written in submission order, so the output is byte-identical for
any worker count. At most ``2 x workers`` chunks are in flight, so memory stays flat
whatever the corpus size.

Tokenisation is the ceiling (DESIGN.md: ~5 MB/s per thread), so the main process does
little besides reading bytes and writing arrays. With one worker everything runs in
process and sentencepiece uses its own thread pool over each chunk instead.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from trident.data.indexed import IndexedDatasetWriter, split_prefix, token_dtype_for_vocab
from trident.data.sources import BadRecord, Record, expand_inputs, iter_records, parse_record
from trident.data.tokenizer import load_tokenizer
from trident.errors import UserError

CHUNK_BYTES = 1 << 20
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
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids))
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
    # Ctrl-C goes to the whole process group; the parent handles it and terminates the pool,
    # so workers ignore it instead of dying mid-result and leaving the pool hung.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
    # Validate the tokenizer (and --append-eod against it) here, before any process starts.
    local = _Encoder(tokenizer, json_key, append_eod, skip_bad_lines, os.cpu_count() or 1, eod_token)
    stats = PreprocessStats(output_prefix=prefix, workers=workers)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", file=sys.stderr, smoothing=0.1)
    start = time.perf_counter()
    pool = None
    chunks = iter_chunks(iter_records(files, text_per_line=text_per_line), chunk_bytes)
    try:
        with IndexedDatasetWriter(prefix, local.dtype) as writer:

            def consume(result: ChunkResult) -> None:
                if result.bad_lines:
                    stats.bad_lines += len(result.bad_lines)
                    if not skip_bad_lines:
                        path, line, reason = result.bad_lines[0]
                        raise UserError(f"{path}:{line}: {reason}; pass --skip-bad-lines to skip and count such lines.")
                writer.add_documents(result.tokens, result.sequence_lengths, result.sequences_per_document)
                stats.documents += len(result.sequences_per_document)
                stats.sequences += len(result.sequence_lengths)
                stats.tokens += int(result.tokens.size)
                stats.text_bytes += result.text_bytes
                stats.empty_documents += result.empty_documents
                if bar is not None:
                    secs = max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(
                        f"{stats.documents / secs:.0f} docs/s, {stats.text_bytes / secs / 1e6:.2f} MB/s text",
                        refresh=False,
                    )
                    bar.update(result.input_bytes)

            if workers == 1:
                for chunk in chunks:
                    consume(local.encode_chunk(chunk))
            else:
                import multiprocessing as mp
                from concurrent.futures import ProcessPoolExecutor

                # spawn: the parent may hold threads (tqdm, torch) that fork would copy mid-lock.
                # An executor (not mp.Pool) fails with BrokenProcessPool if a worker dies,
                # where a Pool would respawn it forever and hang.
                pool = ProcessPoolExecutor(
                    workers, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=encoder_args
                )
                pending: deque = deque()
                for chunk in chunks:
                    pending.append(pool.submit(_encode_in_worker, chunk))
                    if len(pending) >= 2 * workers:
                        consume(pending.popleft().result())
                while pending:
                    consume(pending.popleft().result())
    finally:
        if pool is not None:
            # On an error or Ctrl-C, queued chunks are cancelled; running ones finish (< 1 chunk).
            pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    stats.seconds = time.perf_counter() - start
    return stats
