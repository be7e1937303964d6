"""From the config's `data` section to this rank's train and validation loaders.

When no dataset prefix is given, the default corpus is made once and reused: the Python
standard library's sources as JSONL, a sentencepiece tokenizer trained on them, and the
preprocessed indexed dataset, all under `data.work_dir` keyed by the vocabulary size.
Rank 0 of the world prepares what is missing while the others wait at a barrier, so a
fresh run with many ranks tokenises once; a second run finds everything in place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from trident.data.blend import DataConfig, build_gpt_datasets
from trident.data.corpus import write_stdlib_corpus
from trident.data.indexed import IndexedDataset
from trident.data.loader import DataLoader
from trident.data.preprocess import preprocess
from trident.data.sources import iter_texts
from trident.data.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece
from trident.errors import UserError
from trident.parallel.topology import Topology
from trident.training.config import Config


@dataclass
class DataBundle:
    train: DataLoader
    valid: DataLoader | None
    tokenizer: Tokenizer
    tokenizer_path: str
    prefixes: list[str]


def default_corpus(work_dir: Path, vocab_size: int, log: bool) -> tuple[str, str]:
    """(tokenizer path, dataset prefix) of the stdlib corpus, building what is missing."""
    work_dir.mkdir(parents=True, exist_ok=True)
    corpus = work_dir / "stdlib.jsonl"
    tok_prefix = work_dir / f"stdlib-sp{vocab_size}"
    data_prefix = work_dir / f"stdlib-sp{vocab_size}_text_document"
    if not corpus.exists():
        stats = write_stdlib_corpus(corpus)
        if log:
            print(f"corpus: {stats.files} stdlib files, {stats.bytes / 1e6:.1f} MB -> {corpus}", flush=True)
    if not Path(f"{tok_prefix}.model").exists():
        train_sentencepiece(iter_texts([str(corpus)]), tok_prefix, vocab_size)
        if log:
            print(f"tokenizer: sentencepiece bpe, vocabulary {vocab_size} -> {tok_prefix}.model", flush=True)
    if not IndexedDataset.exists(data_prefix):
        stats = preprocess([str(corpus)], str(data_prefix), f"{tok_prefix}.model", append_eod=True, progress=log)
        if log:
            print(stats.summary(), flush=True)
    return f"{tok_prefix}.model", str(data_prefix)


def build_data(cfg: Config, topo: Topology, consumed_samples: int = 0) -> DataBundle:
    """The tokenizer and this dp rank's loaders; every rank returns the same datasets."""
    d, t = cfg.data, cfg.train
    leader = topo.rank == 0
    distributed = dist.is_available() and dist.is_initialized()
    if d.prefix is None:
        work = Path(d.work_dir)
        if leader:
            default_corpus(work, d.vocab_size, log=True)
        if distributed:
            dist.barrier()
        tokenizer_path, prefix = default_corpus(work, d.vocab_size, log=False)  # all present now
        prefixes = [prefix]
    else:
        prefixes = list(d.prefix)
        if d.tokenizer is None:
            raise UserError("data.tokenizer must name the tokenizer the datasets in data.prefix were made with")
        tokenizer_path = d.tokenizer
    if d.tokenizer is not None:
        tokenizer_path = d.tokenizer
    if not os.path.exists(tokenizer_path):
        raise UserError(f"tokenizer {tokenizer_path!r} does not exist")
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {cfg.model.vocab_size}; "
            f"set model.vocab_size >= {tokenizer.vocab_size}"
        )
    weights = d.weights if d.weights is not None else [1.0] * len(prefixes)
    blend = [(float(w), p) for w, p in zip(weights, prefixes)]
    dc = DataConfig(seq_len=d.seq_len, seed=t.seed, eod_id=tokenizer.eod_id, eod_mask_loss=d.mask_eod_loss)
    n_train = t.steps * t.global_batch_size
    n_valid = max(1, cfg.eval.iters) * t.global_batch_size
    train_ds, valid_ds, _ = build_gpt_datasets(blend, d.split, dc, (n_train, n_valid, None))
    if train_ds is None:
        raise UserError(f"data.split={d.split!r} leaves no documents for training")
    # on a GPU the prefetch thread pins each batch, so the copy to the device is asynchronous
    kw = dict(micro_batch_size=t.micro_batch_size, dp_rank=topo.dp_rank, dp_size=topo.dp, prefetch=d.prefetch,
              pin_memory=topo.device.type == "cuda", vocab_size=cfg.model.vocab_size)
    train = DataLoader(train_ds, t.global_batch_size, consumed_samples=consumed_samples, **kw)
    valid = None
    if valid_ds is not None and len(valid_ds) >= t.global_batch_size:
        valid = DataLoader(valid_ds, t.global_batch_size, cyclic=True, **kw)
    return DataBundle(train=train, valid=valid, tokenizer=tokenizer, tokenizer_path=tokenizer_path, prefixes=prefixes)
