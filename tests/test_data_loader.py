"""The data-parallel loader: disjoint shares, layout-independent global batches, exact resume."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from data_fixtures import *  # noqa: F401,F403
from trident.data.gpt_dataset import GPTDataset
from trident.data.indexed import IndexedDataset
from trident.data.loader import DataLoader, position_ids_from_doc_ids
from trident.errors import UserError

SEQ = 4


class Numbered:
    """Sample i is a row of i's: which samples a rank received is read off the batch."""

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.fail_at = n, fail_at

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if i == self.fail_at:
            raise RuntimeError(f"cannot read sample {i}")
        row = np.full(SEQ, i, dtype=np.int64)
        return {"tokens": row, "labels": row + 1, "loss_mask": np.ones(SEQ, np.float32), "doc_ids": np.zeros(SEQ, np.int64)}


def ids(micro: dict[str, torch.Tensor]) -> list[int]:
    return micro["tokens"][:, 0].tolist()


def global_batches(dataset, gb, mb, dp, consumed=0, steps=None) -> list[list[int]]:
    """Run every dp rank's loader side by side; return each global batch's samples in order."""
    loaders = [DataLoader(dataset, gb, mb, dp_rank=r, dp_size=dp, consumed_samples=consumed) for r in range(dp)]
    out = []
    for step, per_rank in enumerate(zip(*loaders)):
        if steps is not None and step == steps:
            break
        assert all(len(micros) == gb // (mb * dp) for micros in per_rank)
        samples = [i for micros in per_rank for m in micros for i in ids(m)]
        out.append(samples)
    return out


@pytest.mark.parametrize("dp, mb", [(1, 2), (1, 8), (2, 2), (2, 4), (4, 1), (8, 1)])
def test_ranks_share_each_global_batch_disjointly(dp, mb):
    batches = global_batches(Numbered(100), gb=8, mb=mb, dp=dp)
    assert len(batches) == 12  # 100 // 8: the partial global batch at the end is dropped
    for g, samples in enumerate(batches):
        assert sorted(samples) == list(range(8 * g, 8 * g + 8))  # disjoint, complete, same at every layout


def test_megatron_microbatch_order():
    loader = DataLoader(Numbered(64), 8, 2, dp_rank=1, dp_size=2)
    micros = next(iter(loader))
    assert [ids(m) for m in micros] == [[2, 3], [6, 7]]  # slice k of 4 samples, this rank's 2


def test_resume_at_another_dp_size_gives_the_same_remaining_batches():
    data = Numbered(200)
    reference = global_batches(data, gb=16, mb=2, dp=1)
    # train 5 steps at dp=2, save the state, resume at dp=4 and at dp=1 with other microbatches
    first = [DataLoader(data, 16, 2, dp_rank=r, dp_size=2) for r in range(2)]
    for step, _ in enumerate(zip(*first)):
        if step == 4:
            break
    state = first[0].state_dict()
    assert state == {"consumed_samples": 80} and first[1].state_dict() == state
    for dp, mb in ((4, 2), (1, 4), (8, 1)):
        resumed = global_batches(data, gb=16, mb=mb, dp=dp, consumed=state["consumed_samples"])
        assert [sorted(b) for b in resumed] == [sorted(b) for b in reference[5:]]
    loader = DataLoader(data, 16, 4, dp_rank=0, dp_size=1)
    loader.load_state_dict(state)
    assert ids(next(iter(loader))[0]) == [80, 81, 82, 83] and loader.consumed_samples == 96


def test_counter_len_cyclic_and_reiteration():
    loader = DataLoader(Numbered(40), 8, 4)
    assert len(loader) == 5
    it = iter(loader)
    next(it)
    next(it)
    it.close()
    assert loader.consumed_samples == 16 and len(loader) == 3
    assert ids(next(iter(loader))[0]) == [16, 17, 18, 19]  # iterating again continues from the counter
    cyc = DataLoader(Numbered(12), 8, 4, cyclic=True)
    it = iter(cyc)
    assert [ids(m) for m in next(it)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [ids(m) for m in next(it)] == [[8, 9, 10, 11], [0, 1, 2, 3]]
    it.close()


def test_prefetch_thread_errors_reach_the_caller_and_threads_stop():
    loader = DataLoader(Numbered(64, fail_at=20), 8, 4, prefetch=3)
    seen = []
    with pytest.raises(RuntimeError, match="cannot read sample 20"):
        for micros in loader:
            seen.append(micros)
    assert len(seen) == 2 and loader.consumed_samples == 16
    it = iter(DataLoader(Numbered(64), 8, 4))
    next(it)
    it.close()
    assert not any(t.name == "trident-data-prefetch" and t.is_alive() for t in threading.enumerate())


def test_user_errors():
    with pytest.raises(UserError, match="global_batch_size 10 must be a multiple of .* = 8"):
        DataLoader(Numbered(100), 10, 4, dp_size=2)
    with pytest.raises(UserError, match="dp_rank 2"):
        DataLoader(Numbered(100), 8, 4, dp_rank=2, dp_size=2)
    with pytest.raises(UserError, match="consumed_samples 12"):
        DataLoader(Numbered(100), 8, 4, consumed_samples=12)
    with pytest.raises(UserError, match="fewer than one global batch"):
        DataLoader(Numbered(4), 8, 4)


def test_batches_from_a_real_dataset(stdlib_prefix):
    ds = IndexedDataset(stdlib_prefix)
    g = GPTDataset(ds, np.arange(len(ds)), 32, seed=1, eod_id=2, eod_mask_loss=True, use_cache=False)
    micros = next(iter(DataLoader(g, 8, 2, dp_rank=1, dp_size=2)))
    assert len(micros) == 2
    m = micros[0]
    assert {k: (tuple(v.shape), v.dtype) for k, v in m.items()} == {
        "tokens": ((2, 32), torch.int64), "labels": ((2, 32), torch.int64),
        "loss_mask": ((2, 32), torch.float32), "doc_ids": ((2, 32), torch.int64),
    }
    assert torch.equal(m["tokens"][0], torch.from_numpy(g[2]["tokens"]))


def test_position_ids_restart_per_document():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0], [0, 1, 2, 3, 4, 5]])
    assert position_ids_from_doc_ids(doc_ids).tolist() == [
        [0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 0, 0]
    ]


def test_token_ids_outside_the_vocabulary_are_named_on_the_cpu_batch():
    # sample i holds id i (labels i + 1): with a vocabulary of 10, samples 0..8 pass, sample 9's
    # labels (10) and everything from sample 10 on do not
    ok = DataLoader(Numbered(9), 3, 3, vocab_size=10)
    assert [ids(m) for micros in ok for m in micros] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    loader = DataLoader(Numbered(12), 3, 3, vocab_size=10)
    it = iter(loader)
    next(it), next(it), next(it)
    with pytest.raises(UserError) as err:
        next(it)
    assert "sample 9" in str(err.value) and "token id 10" in str(err.value) and "[0, 10)" in str(err.value)
