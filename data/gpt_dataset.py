"""The GPT dataset: documents packed into samples of ``seq_len + 1`` tokens, across boundaries.

Three indices, all deterministic from the seed and the same as Megatron-LM's
``GPTDataset`` builds (``megatron/core/datasets/gpt_dataset.py``, ``helpers.cpp``):

- document index ``[epochs * docs]`` int32: the split's sequence ids repeated once per
  epoch and shuffled with ``RandomState(seed)``; when the last epoch is used for fewer
  than 80% of its samples, it is shuffled separately ("separate final epoch"), so a
  sliver of an extra epoch does not favour whichever documents the global shuffle put early.
- sample index ``[samples + 1, 2]`` int64: (position in the document index, token offset)
  of every sample boundary. Sample i spans boundary i to boundary i+1 *inclusive*, so
  consecutive samples share one token (the last label of one is the first input of the
  next) and no token is wasted. Built with one cumsum and one searchsorted.
- shuffle index ``[samples]``: a permutation of the samples (again separate for a
  separated final epoch).

They are cached next to the data (``cache.py``) under a name that hashes every input.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from trident.data.cache import ArrayCache, Barrier, cached_build, digest
from trident.data.indexed import IndexedDataset
from trident.errors import UserError

SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80
INDEX_VERSION = 1  # bump when the index algorithm changes, so old caches are not reused


def num_epochs_needed(tokens_per_epoch: int, seq_len: int, num_samples: int | None) -> int:
    """Fewest epochs holding ``num_samples * seq_len + 1`` tokens (the +1: the last label)."""
    if num_samples is None:
        return 1
    return max(1, math.ceil((num_samples * seq_len + 1) / tokens_per_epoch))


def build_document_index(
    documents: np.ndarray, num_epochs: int, rng: np.random.RandomState, separate_final_epoch: bool
) -> np.ndarray:
    """``documents`` once per epoch, shuffled; the final epoch on its own when separated."""
    if not separate_final_epoch or num_epochs == 1:
        index = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)  # [epochs * docs]
        rng.shuffle(index)
        return index
    first = build_document_index(documents, num_epochs - 1, rng, False)
    last = build_document_index(documents, 1, rng, False)
    return np.concatenate([first, last])


def build_sample_index(sequence_lengths: np.ndarray, document_index: np.ndarray, seq_len: int) -> np.ndarray:
    """Sample boundaries ``[n + 1, 2]``: (document-index position, offset), vectorised.

    Boundary i is the token at stream position ``i * seq_len`` of the documents laid end
    to end in document-index order; it is the first token of sample i and the last (the
    extra label token) of sample i - 1.
    """
    lengths = np.asarray(sequence_lengths)[document_index].astype(np.int64)  # [E*D]
    ends = np.cumsum(lengths)  # [E*D] exclusive end of each document in the stream
    total = int(ends[-1]) if len(ends) else 0
    num_samples = (total - 1) // seq_len if total > 0 else 0
    if num_samples < 1:
        raise UserError(
            f"the documents hold {total} tokens, fewer than one sample of seq_len + 1 = {seq_len + 1}; "
            "use more data or a shorter sequence length."
        )
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_len  # [n+1]
    # side="right": a position equal to a document's end belongs to the next document,
    # and empty documents (start == end) never contain one.
    doc_pos = np.searchsorted(ends, positions, side="right")  # [n+1]
    offsets = positions - (ends[doc_pos] - lengths[doc_pos])  # [n+1]
    return np.stack([doc_pos, offsets], axis=1)  # [n+1, 2]


def build_shuffle_index(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """A permutation of ``[0, total_size)`` that shuffles ``[0, num_samples)`` and the rest apart."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate([first, last])


def build_indices(
    sequence_lengths: np.ndarray,
    documents: np.ndarray,
    seq_len: int,
    num_samples: int | None,
    seed: int,
) -> dict[str, np.ndarray]:
    """The three indices for ``documents`` (sequence ids into ``sequence_lengths``)."""
    documents = np.asarray(documents, dtype=np.int32)
    tokens_per_epoch = int(np.asarray(sequence_lengths)[documents].sum(dtype=np.int64))
    if tokens_per_epoch <= seq_len:
        raise UserError(
            f"{len(documents)} documents hold {tokens_per_epoch} tokens, not enough for one sample of "
            f"seq_len + 1 = {seq_len + 1}; use more data or a shorter sequence length."
        )
    num_epochs = num_epochs_needed(tokens_per_epoch, seq_len, num_samples)
    separate_final_epoch = False
    samples_before_final = 0
    if num_epochs > 1:
        samples_before_final = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_len
        from_final = num_samples - samples_before_final  # type: ignore[operator]
        per_epoch = (tokens_per_epoch - 1) // seq_len
        separate_final_epoch = from_final < int(SEPARATE_FINAL_EPOCH_THRESHOLD * per_epoch)
    rng = np.random.RandomState(seed)
    document_index = build_document_index(documents, num_epochs, rng, separate_final_epoch)
    sample_index = build_sample_index(sequence_lengths, document_index, seq_len)
    total = len(sample_index) - 1
    shuffle_index = build_shuffle_index(samples_before_final if separate_final_epoch else total, total, rng)
    return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


def default_cache_dir(prefix: str) -> Path:
    """``<folder of the data>/cache``: next to the data, as the issue and Megatron do."""
    return Path(os.path.abspath(prefix)).parent / "cache"


class GPTDataset:
    """Packed samples over a range of an indexed dataset.

    ``ds[i]`` is a dict of numpy arrays, each ``[seq_len]``:
    ``tokens`` (inputs) and ``labels`` int64; ``loss_mask`` float32 (0 at EOD inputs when
    ``eod_mask_loss``); ``doc_ids`` int64, the document of each input token numbered from 0
    along the row, which is what document-level attention masking and position-id reset
    need. A document is a stored sequence (the same thing unless the corpus was split
    into sentences).
    """

    def __init__(
        self,
        indexed: IndexedDataset,
        documents: np.ndarray,
        seq_len: int,
        num_samples: int | None = None,
        seed: int = 1234,
        eod_id: int | None = None,
        eod_mask_loss: bool = False,
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
        name: str = "train",
        barrier: Barrier | None = None,
        is_builder: bool | None = None,
    ) -> None:
        if seq_len < 1:
            raise UserError(f"seq_len {seq_len} must be at least 1.")
        if num_samples is not None and num_samples < 1:
            raise UserError(f"num_samples {num_samples} must be positive (or None for one epoch).")
        if eod_mask_loss and eod_id is None:
            raise UserError("eod_mask_loss needs the tokenizer's end-of-document id (eod_id), which was not given.")
        self.indexed = indexed
        self.documents = np.asarray(documents, dtype=np.int32)  # [docs] sequence ids
        if len(self.documents) == 0:
            raise UserError(f"the {name} split of {indexed.prefix} holds no documents; change the split.")
        self.seq_len = seq_len
        self.num_samples = num_samples
        self.seed = seed
        self.eod_id = eod_id
        self.eod_mask_loss = eod_mask_loss
        self.name = name
        lengths = indexed.sequence_lengths
        description = {
            "class": "GPTDataset",
            "version": INDEX_VERSION,
            "path": os.path.abspath(indexed.prefix),
            "split": name,
            "documents": [int(self.documents[0]), int(self.documents[-1]), len(self.documents), digest(self.documents)],
            "lengths": digest(lengths[self.documents]),
            "seq_len": seq_len,
            "num_samples": num_samples,
            "seed": seed,
            "separate_final_epoch_threshold": SEPARATE_FINAL_EPOCH_THRESHOLD,
        }
        stem = f"{Path(indexed.prefix).name}-{name}"
        cache = ArrayCache((cache_dir or default_cache_dir(indexed.prefix)) if use_cache else None, stem, description)
        arrays = cached_build(
            cache,
            lambda: build_indices(lengths, self.documents, seq_len, num_samples, seed),
            barrier=barrier,
            is_builder=is_builder,
        )
        self.document_index = arrays["document_index"]  # [epochs * docs] int32
        self.sample_index = arrays["sample_index"]  # [n + 1, 2] int64
        self.shuffle_index = arrays["shuffle_index"]  # [n]
        self.cache_name = cache.name

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def sample_tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``seq_len + 1`` tokens of sample i and their document ids, both ``[seq_len + 1]``."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} is outside the {self.name} dataset of {len(self)} samples")
        j = int(self.shuffle_index[i])
        (d0, o0), (d1, o1) = self.sample_index[j], self.sample_index[j + 1]
        d0, o0, d1, o1 = int(d0), int(o0), int(d1), int(o1)
        get = self.indexed.get
        if d0 == d1:
            pieces = [get(int(self.document_index[d0]), o0, o1 - o0 + 1)]
        else:
            pieces = [get(int(self.document_index[d0]), o0)]
            pieces += [get(int(self.document_index[k])) for k in range(d0 + 1, d1)]
            pieces.append(get(int(self.document_index[d1]), 0, o1 + 1))
        lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
        lengths = lengths[lengths > 0]  # an empty document contributes no tokens and no id
        tokens = np.concatenate(pieces).astype(np.int64)  # [s+1]
        doc_ids = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)  # [s+1]
        return tokens, doc_ids

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        tokens, doc_ids = self.sample_tokens(int(i))
        inputs = tokens[:-1]  # [s]
        loss_mask = np.ones(self.seq_len, dtype=np.float32)  # [s]
        if self.eod_mask_loss:
            loss_mask[inputs == self.eod_id] = 0.0
        return {"tokens": inputs, "labels": tokens[1:], "loss_mask": loss_mask, "doc_ids": doc_ids[:-1]}
