"""`trident bench data`: preprocessing, index-build and loader throughput, printed as figures.

Preprocessing runs on the stdlib corpus (real text) once per worker count; the index
build uses a synthetic document-length array of 10^9 tokens in 10^7 documents (the
index never reads tokens, so no 2 GB file is needed); the loader reads packed samples
from the preprocessed corpus. Nothing here is asserted: tests never time anything.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from typing import Iterator


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data", help="preprocessing MB/s by workers (vs the tokenizer alone), index-build seconds, loader samples/s",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--corpus-mb", type=float, default=8.0, help="stdlib text to preprocess (MB)")
    parser.add_argument("--workers", default=None, help="comma-separated worker counts (default: 1 and all cores)")
    parser.add_argument("--repeats", type=int, default=3, help="preprocess / tokenizer timings (median reported)")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--index-tokens", type=float, default=1e9, help="synthetic corpus size for the index build")
    parser.add_argument("--index-docs", type=float, default=1e7)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--workdir", default=None, help="keep the files here instead of a temporary folder")
    parser.add_argument("--blend-samples", default="1e7,1e8", help="comma-separated blend sizes for the blend-index build")
    parser.add_argument("--blend-weights", default="0.5,0.3,0.2", help="comma-separated blend weights (normalised)")
    parser.add_argument("--only-blend", action="store_true", help="run only the blend-index comparison")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    weights = [float(w) for w in args.blend_weights.split(",")]
    weights = [w / sum(weights) for w in weights]
    _bench_blend(weights, [int(float(n)) for n in args.blend_samples.split(",")])
    if args.only_blend:
        return 0
    cores = os.cpu_count() or 1
    workers = [int(w) for w in args.workers.split(",")] if args.workers else sorted({1, cores})
    with _workdir(args.workdir) as workdir:
        corpus = _write_corpus(workdir, args.corpus_mb, cores)
        prefix = _bench_preprocess(corpus, workdir, workers, args.vocab_size, args.repeats)
        _bench_index(int(args.index_docs), int(args.index_tokens), args.seq_len)
        _bench_loader(prefix, workdir, args.seq_len, args.micro_batch)
    return 0


@contextlib.contextmanager
def _workdir(keep: str | None) -> Iterator[str]:
    """`keep` (created when missing), or a temporary folder deleted afterwards."""
    if keep is not None:
        os.makedirs(keep, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="trident-bench-data-") as tmp:
        yield tmp


def _write_corpus(workdir: str, corpus_mb: float, cores: int) -> str:
    """The first stdlib files (sorted) up to `corpus_mb`, as JSONL: deterministic across machines."""
    from trident.data.corpus import stdlib_root, stdlib_sources, write_stdlib_corpus

    root, budget, chosen = stdlib_root(), corpus_mb * 1e6, []
    for rel in stdlib_sources():
        chosen.append(rel.as_posix())
        budget -= (root / rel).stat().st_size
        if budget <= 0:
            break
    corpus = os.path.join(workdir, "stdlib.jsonl")
    stats = write_stdlib_corpus(corpus, include=chosen)
    print(f"corpus: {stats.files} stdlib files, {stats.bytes / 1e6:.1f} MB; {cores} cores")
    return corpus


def _bench_preprocess(corpus: str, workdir: str, workers: list[int], vocab_size: int, repeats: int) -> str:
    """Train a tokenizer, then time preprocessing at each worker count; the last output's prefix.

    The tokenizer's own batch encode of the same texts is timed between preprocess runs
    (a shared machine drifts), and preprocess is reported as a fraction of it.
    """
    from trident.data.preprocess import preprocess, usable_cores
    from trident.data.sources import iter_texts
    from trident.data.tokenizer import train_sentencepiece

    t = time.perf_counter()
    model = train_sentencepiece(iter_texts([corpus]), os.path.join(workdir, "tok"), vocab_size, "bpe")
    print(f"tokenizer: bpe vocab {vocab_size} trained in {time.perf_counter() - t:.1f} s")

    texts = _corpus_texts(corpus)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"preprocess vs the tokenizer's own batch encode of the same {mb:.1f} MB of text (median of {repeats}, "
          "interleaved; workers=1 is a thread per core in process, N>1 processes):")
    prefix = ""
    rates: dict[str, list[float]] = {"tokenizer": []}
    for _ in range(repeats):
        rates["tokenizer"].append(_tokenizer_rate(model, texts))
        for n in workers:
            prefix = os.path.join(workdir, f"stdlib_w{n}")
            s = preprocess([corpus], prefix, model, workers=n, append_eod=True, progress=False)
            rates.setdefault(f"workers={n}", []).append(s.text_bytes / s.seconds / 1e6)
    base = statistics.median(rates["tokenizer"])
    print(f"  tokenizer encode_batch (num_threads={usable_cores()}): {base:7.2f} MB/s")
    for name, values in rates.items():
        if name != "tokenizer":
            rate = statistics.median(values)
            print(f"  preprocess {name}: {rate:7.2f} MB/s, {rate / base:.0%} of the tokenizer ({s.tokens} tokens)")
    return prefix


def _corpus_texts(corpus: str) -> list[str]:
    """The texts preprocess tokenises, read and parsed once, so the tokenizer is timed alone."""
    from trident.data.sources import iter_records, parse_record

    return [t for r in iter_records([corpus]) for t in parse_record(r) if t.strip()]


def _tokenizer_rate(model: str, texts: list[str]) -> float:
    """MB/s of one batch-encode call over every text on all cores: preprocess's ceiling."""
    from trident.data.preprocess import usable_cores
    from trident.data.tokenizer import load_tokenizer

    tok = load_tokenizer(model)
    t = time.perf_counter()
    tok.encode_batch(texts, num_threads=usable_cores())
    secs = time.perf_counter() - t
    return sum(len(x.encode("utf-8")) for x in texts) / secs / 1e6


def _bench_index(n_docs: int, n_tokens: int, seq_len: int) -> None:
    """Time the sample-index build over synthetic document lengths (no token file needed)."""
    import numpy as np

    from trident.data.gpt_dataset import build_indices

    rng = np.random.default_rng(0)
    mean = n_tokens / n_docs
    lengths = rng.integers(1, int(2 * mean), size=n_docs, dtype=np.int32)  # [docs], mean ~ n_tokens/n_docs
    t = time.perf_counter()
    idx = build_indices(lengths, np.arange(n_docs, dtype=np.int32), seq_len, None, 1234)
    secs = time.perf_counter() - t
    print(
        f"index build: {int(lengths.sum(dtype=np.int64)) / 1e9:.3f}e9 tokens, {n_docs:.0e} documents, "
        f"seq_len {seq_len}: {secs:.2f} s for {len(idx['shuffle_index'])} samples"
    )


def _bench_loader(prefix: str, workdir: str, seq_len: int, micro_batch: int) -> None:
    """Time the loader over packed samples of the preprocessed corpus at `prefix`."""
    import numpy as np

    from trident.data.gpt_dataset import GPTDataset
    from trident.data.indexed import IndexedDataset
    from trident.data.loader import DataLoader

    ds = GPTDataset(IndexedDataset(prefix), np.arange(len(IndexedDataset(prefix))), seq_len, seed=1234,
                    eod_id=2, cache_dir=os.path.join(workdir, "cache"))
    gb = micro_batch * 4
    loader = DataLoader(ds, global_batch_size=gb, micro_batch_size=micro_batch)
    t = time.perf_counter()
    batches = sum(1 for _ in loader)
    secs = time.perf_counter() - t
    samples = batches * gb
    print(
        f"loader: {samples} samples of seq_len {seq_len} in {secs:.2f} s: {samples / secs:.0f} samples/s, "
        f"{samples * seq_len / secs / 1e6:.1f} Mtok/s (micro batch {micro_batch}, prefetch thread)"
    )


def _bench_blend(weights: list[float], sizes: list[int]) -> None:
    """Blend-index build: the former Python loop (timed on 10^5 samples, scaled linearly: it
    is a fixed cost per sample), the vectorised build, and Megatron-LM's C++ helper when
    megatron-core is installed (its compiled ``helpers_cpp``); the results are compared."""
    import numpy as np

    from trident.data.blend_indices import blend_indices, sequential_blend_indices

    probe = 100_000
    t = time.perf_counter()
    sequential_blend_indices(weights, probe)
    per_sample = (time.perf_counter() - t) / probe
    megatron, why = _megatron_helper()
    print(f"blend indices, weights {[round(w, 4) for w in weights]} (seconds; the loop is {per_sample * 1e6:.2f} us/sample "
          f"on {probe} samples, scaled):")
    print(f"  {'samples':>12} {'python loop':>12} {'trident':>9} {'megatron C++':>13}  identical")
    for n in sizes:
        t = time.perf_counter()
        index, sample = blend_indices(weights, n)
        ours = time.perf_counter() - t
        theirs, same = "n/a", "n/a"
        if megatron is not None:
            ref_index, ref_sample = np.zeros(n, dtype=np.int16), np.zeros(n, dtype=np.int64)
            t = time.perf_counter()
            megatron.build_blending_indices(ref_index, ref_sample, np.asarray(weights, dtype=np.float64),
                                            len(weights), n, False)
            theirs = f"{time.perf_counter() - t:.2f}"
            same = str(bool(np.array_equal(index, ref_index) and np.array_equal(sample, ref_sample)))
            del ref_index, ref_sample
        print(f"  {n:>12.0e} {per_sample * n:>12.1f} {ours:>9.2f} {theirs:>13}  {same}")
        del index, sample
    if megatron is None:
        print(f"  megatron C++: not measured ({why})")


def _megatron_helper() -> tuple[object | None, str]:
    """Megatron-LM's compiled blend helper, or None and why not."""
    import warnings

    try:
        with warnings.catch_warnings():  # megatron.core warns about optional CUDA libraries on import
            warnings.simplefilter("ignore")
            from megatron.core.datasets import helpers_cpp  # type: ignore[import-not-found]
    except Exception as err:  # not installed, or its C++ extension not built for this python
        return None, f"megatron.core.datasets.helpers_cpp unavailable: {type(err).__name__}: {err}"
    return helpers_cpp, ""
