"""Which samples each data-parallel rank reads, and the micro-batches made from them.

Same order as Megatron-LM's pretraining sampler: the sample stream is cut into "global
micro steps" of `micro_batch_size * dp_size` consecutive samples and DP rank r takes the
r-th slice of `micro_batch_size`.  Micro step k of rank r therefore reads the samples

    consumed_samples + k * mbs * dp + r * mbs + [0, mbs)

(modulo the dataset length).  The position is a pure function of `consumed_samples` -
which the checkpoint stores as `steps * global_batch_size` - so a resumed run reads
exactly the micro-batches the uninterrupted run would have read, with no sampler state.
Randomness lives in GPTDataset's shuffle index (seeded), not here.
"""

from __future__ import annotations

import warnings
from typing import Dict, Iterator, List, Mapping

import torch

__all__ = ["DataParallelSampler", "collate_text_samples", "text_microbatches"]

# Key -> dtype of a text micro-batch; GPTDataset returns these per sample.
TEXT_BATCH_DTYPES: Mapping[str, torch.dtype] = {
    "tokens": torch.int64,
    "labels": torch.int64,
    "loss_mask": torch.float32,
    "position_ids": torch.int64,
}


class DataParallelSampler:
    """Endless iterator of this DP rank's micro-batch sample indices (lists of `mbs` ints).

    When the stream runs past `total_samples` it wraps to index 0 (another pass in the same
    order) and warns once; size the dataset with `build_text_datasets(num_samples=...)`
    so that this does not happen.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
    ) -> None:
        if micro_batch_size < 1 or dp_size < 1:
            raise ValueError(f"micro_batch_size ({micro_batch_size}) and dp_size ({dp_size}) must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")
        step = micro_batch_size * dp_size
        if total_samples < step:
            raise ValueError(
                f"the dataset has {total_samples} samples, fewer than one micro step across DP "
                f"(micro_batch_size {micro_batch_size} x dp {dp_size} = {step}); build more samples"
            )
        if consumed_samples < 0 or consumed_samples % step:
            raise ValueError(
                f"consumed_samples={consumed_samples} must be a non-negative multiple of "
                f"micro_batch_size x dp_size = {step} (it counts whole global batches)"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    def __iter__(self) -> Iterator[List[int]]:
        mbs, total = self.micro_batch_size, self.total_samples
        position = self.consumed_samples + self.dp_rank * mbs
        warned = False
        while True:
            if position + mbs > total and not warned:
                warnings.warn(
                    f"DataParallelSampler: past the dataset's {total} samples, starting another "
                    f"pass over them; request more samples when building the dataset",
                    stacklevel=2,
                )
                warned = True
            yield [(position + j) % total for j in range(mbs)]
            position += mbs * self.dp_size


def collate_text_samples(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Stack GPTDataset samples into `[mbs, S]` tensors (other keys are dropped)."""
    return {
        key: torch.stack([s[key] for s in samples]).to(dtype)
        for key, dtype in TEXT_BATCH_DTYPES.items()
    }


def text_microbatches(
    dataset: torch.utils.data.Dataset, sampler: DataParallelSampler, *, num_workers: int = 0
) -> Iterator[Dict[str, torch.Tensor]]:
    """Endless micro-batches `{tokens, labels, loss_mask, position_ids}` of this DP rank.

    `num_workers > 0` reads through a torch DataLoader with worker processes (same order);
    0 reads in the calling process, which is simplest and enough for small models.
    """
    if num_workers <= 0:
        for indices in sampler:
            yield collate_text_samples([dataset[i] for i in indices])
        return
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_text_samples,
    )
    yield from loader
