"""DataParallelSampler: disjoint, covering, resumable; text_microbatches: shapes and dtypes."""

from __future__ import annotations

import itertools

import pytest
import torch

from megatron_omni.data import DataParallelSampler, text_microbatches


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_ranks_are_disjoint_and_cover_consecutive_samples():
    mbs, dp, steps, consumed = 2, 3, 5, 12
    per_rank = [_take(DataParallelSampler(1000, consumed, mbs, r, dp), steps) for r in range(dp)]
    for k in range(steps):  # each global micro step: rank r takes the r-th slice of mbs
        step = [i for r in range(dp) for i in per_rank[r][k]]
        assert step == list(range(consumed + k * mbs * dp, consumed + (k + 1) * mbs * dp))
    everything = [i for batches in per_rank for batch in batches for i in batch]
    assert sorted(everything) == list(range(consumed, consumed + steps * mbs * dp))


def test_resume_equals_uninterrupted_run():
    mbs, dp, gbs = 2, 2, 8  # 2 micro-batches per rank per global batch
    for rank in range(dp):
        full = _take(DataParallelSampler(100, 0, mbs, rank, dp), 12)
        done_steps = 3
        resumed = _take(DataParallelSampler(100, done_steps * gbs, mbs, rank, dp), 12 - 6)
        assert resumed == full[done_steps * gbs // (mbs * dp):]


def test_wraps_with_a_warning():
    sampler = DataParallelSampler(10, 8, 2, 0, 1)
    with pytest.warns(UserWarning, match="another pass"):
        assert _take(sampler, 3) == [[8, 9], [0, 1], [2, 3]]


def test_invalid_arguments_are_explained():
    with pytest.raises(ValueError, match="multiple of micro_batch_size x dp_size = 4"):
        DataParallelSampler(100, 6, 2, 0, 2)
    with pytest.raises(ValueError, match="fewer than one micro step"):
        DataParallelSampler(3, 0, 2, 0, 2)
    with pytest.raises(ValueError, match="dp_rank 2 is outside"):
        DataParallelSampler(100, 0, 2, 2, 2)


def _fake_sample(i, seq=5):
    tokens = torch.arange(i, i + seq)
    return {"tokens": tokens, "labels": tokens + 1, "loss_mask": torch.ones(seq),
            "position_ids": torch.arange(seq), "dataset_id": 0}


@pytest.mark.parametrize("num_workers", [0, 1])
def test_text_microbatches_collate(num_workers):
    dataset = [_fake_sample(i) for i in range(40)]
    sampler = DataParallelSampler(len(dataset), 8, micro_batch_size=4, dp_rank=1, dp_size=2)
    batches = text_microbatches(dataset, sampler, num_workers=num_workers)
    batch = next(batches)
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert batch["tokens"].shape == (4, 5) and batch["tokens"].dtype == torch.int64
    assert batch["labels"].dtype == torch.int64 and batch["position_ids"].dtype == torch.int64
    assert batch["loss_mask"].dtype == torch.float32
    assert batch["tokens"][:, 0].tolist() == [12, 13, 14, 15]  # consumed 8 + rank 1 * mbs 4
    assert next(batches)["tokens"][:, 0].tolist() == [20, 21, 22, 23]
    batches.close()  # stops the DataLoader workers now
