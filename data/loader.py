"""The data-parallel loader: each dp rank's microbatches of every global batch, resumable.

Global batch g (counting from ``consumed_samples``) is dataset samples
``[c, c + global_batch_size)``, whatever the layout. It is cut into
``num_microbatches = global_batch_size / (micro_batch_size * dp_size)`` slices of
``micro_batch_size * dp_size`` consecutive samples, and rank r takes the r-th
``micro_batch_size`` samples of each slice (Megatron's ``MegatronPretrainingSampler``).
The only state is the global consumed-samples counter, so a run saved at one dp size
resumes at another with exactly the same remaining global batches.

A background thread assembles the next batches while the step runs; reading a memmap
and copying numpy arrays release the GIL for most of their time.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator, Protocol

import numpy as np
import torch

from trident.errors import UserError

BATCH_KEYS = ("tokens", "labels", "loss_mask", "doc_ids")


class SampleDataset(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> dict[str, np.ndarray]: ...


def position_ids_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 at each document: ``[b, s]`` -> ``[b, s]``.

    For models that reset position ids (RoPE or learned) per packed document.
    """
    b, s = doc_ids.shape
    idx = torch.arange(s, device=doc_ids.device).expand(b, s)  # [b, s]
    starts = torch.ones_like(doc_ids, dtype=torch.bool)  # [b, s] True where a document begins
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values  # [b, s]
    return idx - first


def collate(samples: list[dict[str, np.ndarray]], pin_memory: bool = False) -> dict[str, torch.Tensor]:
    """Stack samples into ``tokens``/``labels``/``doc_ids`` int64 and ``loss_mask`` float32, each ``[b, s]``."""
    batch = {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in BATCH_KEYS}
    if pin_memory:
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return batch


def _check_token_ids(batch: dict[str, torch.Tensor], indices: np.ndarray, vocab_size: int) -> None:
    """One sentence naming the sample and the id when a batch holds a token the model has no
    row for (a dataset made with another tokenizer, or a corrupt .bin)."""
    t = torch.cat([batch["tokens"], batch["labels"]], dim=1)  # [b, 2s], on the CPU
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab_size):
        outside = (t < 0) | (t >= vocab_size)
        row = int(outside.any(dim=1).nonzero()[0])
        raise UserError(
            f"sample {int(indices[row])} of the dataset holds token id {int(t[row][outside[row]][0])}, outside the "
            f"model's vocabulary [0, {vocab_size}); was the dataset made with another tokenizer? "
            f"(set model.vocab_size to the tokenizer's size or re-run trident preprocess)"
        )


class DataLoader:
    """Iterating yields, per global batch, this rank's list of ``num_microbatches`` batches.

    ``consumed_samples`` advances by ``global_batch_size`` when a global batch is handed
    out; save ``state_dict()`` with the checkpoint after the step that used it.
    """

    def __init__(
        self,
        dataset: SampleDataset,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        consumed_samples: int = 0,
        prefetch: int = 2,
        cyclic: bool = False,
        pin_memory: bool = False,
        vocab_size: int | None = None,
    ) -> None:
        """`vocab_size`: when given, every batch's token ids are checked against it here, on
        the CPU batch in the prefetch thread, so the model's step never reads token values
        back from the device (a host-device synchronisation) to validate them."""
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise UserError(f"dp_rank {dp_rank} must lie in [0, dp_size) with dp_size {dp_size} >= 1.")
        if micro_batch_size < 1 or global_batch_size < 1:
            raise UserError(
                f"micro_batch_size {micro_batch_size} and global_batch_size {global_batch_size} must be positive."
            )
        if global_batch_size % (micro_batch_size * dp_size):
            raise UserError(
                f"global_batch_size {global_batch_size} must be a multiple of micro_batch_size x dp_size = "
                f"{micro_batch_size} x {dp_size} = {micro_batch_size * dp_size}."
            )
        if len(dataset) < global_batch_size:
            raise UserError(
                f"the dataset has {len(dataset)} samples, fewer than one global batch of {global_batch_size}."
            )
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.num_microbatches = global_batch_size // (micro_batch_size * dp_size)
        self.prefetch = max(1, prefetch)
        self.cyclic = cyclic
        self.pin_memory = pin_memory
        self.vocab_size = vocab_size
        self._consumed = 0
        self.load_state_dict({"consumed_samples": consumed_samples})

    # -- state -------------------------------------------------------------------------
    @property
    def consumed_samples(self) -> int:
        return self._consumed

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self._consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        consumed = int(state["consumed_samples"])
        if consumed < 0 or consumed % self.global_batch_size:
            raise UserError(
                f"consumed_samples {consumed} is not a multiple of the global batch size {self.global_batch_size}; "
                "resume with the global batch size the run was saved with."
            )
        self._consumed = consumed

    def __len__(self) -> int:
        """Global batches left (non-cyclic), or per pass over the data (cyclic)."""
        if self.cyclic:
            return len(self.dataset) // self.global_batch_size
        return max(0, (len(self.dataset) - self._consumed) // self.global_batch_size)

    # -- which samples ---------------------------------------------------------------------
    def global_batch_indices(self, consumed: int) -> np.ndarray:
        """Dataset indices of the global batch that starts at ``consumed``: ``[global_batch]``."""
        idx = np.arange(consumed, consumed + self.global_batch_size, dtype=np.int64)
        return idx % len(self.dataset) if self.cyclic else idx

    def rank_microbatch_indices(self, consumed: int) -> np.ndarray:
        """This rank's share: ``[num_microbatches, micro_batch]`` dataset indices."""
        idx = self.global_batch_indices(consumed)
        per = idx.reshape(self.num_microbatches, self.dp_size, self.micro_batch_size)  # [m, dp, mb]
        return per[:, self.dp_rank, :]

    def _load(self, consumed: int) -> list[dict[str, torch.Tensor]]:
        micros = []
        for micro in self.rank_microbatch_indices(consumed):
            batch = collate([self.dataset[int(i)] for i in micro], self.pin_memory)
            if self.vocab_size is not None:
                _check_token_ids(batch, micro, self.vocab_size)
            micros.append(batch)
        return micros

    def _has(self, consumed: int) -> bool:
        return self.cyclic or consumed + self.global_batch_size <= len(self.dataset)

    # -- iteration -----------------------------------------------------------------------
    def __iter__(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        """Batches from the current ``consumed_samples`` on, assembled ahead by a thread."""
        start = self._consumed
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def produce() -> None:
            consumed = start
            try:
                while not stop.is_set() and self._has(consumed):
                    item = self._load(consumed)
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    consumed += self.global_batch_size
                item = done
            except BaseException as err:  # hand the error to the consumer, with its traceback
                item = err
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        thread = threading.Thread(target=produce, name="trident-data-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                self._consumed += self.global_batch_size
                yield item
        finally:
            stop.set()
            thread.join(timeout=5)
