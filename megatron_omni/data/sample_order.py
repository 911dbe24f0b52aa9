"""Which samples of a modality are held out for validation, and in what order the rest are read.

Everything is a pure function of (seed, modality, source sizes and weights, epoch, DP rank/size),
so every rank -- and every TP rank / pipeline stage of one DP rank -- derives the same order
without communicating, and a position (epoch, cursor) is enough to resume.

* Validation: ``validation_size`` samples of the modality, split over its sources in proportion
  to their weights; from each source the first ones of a seeded, epoch-independent permutation.
  They never appear in training.
* Epoch e: source i contributes ``round(N * w_i / sum(w))`` training samples, N = all training
  samples of the modality (a source with a large weight is re-read, a small one subsampled), each
  drawn without repetition from successive seeded permutations of its pool; the combined list is
  shuffled with a seed of its own.  Keys are ``(source index, sample index in the source)``.
* DP rank r reads positions r, r + dp, r + 2 dp, ... of the epoch: the shards are disjoint and
  together cover the epoch.
"""

from __future__ import annotations

import zlib
from typing import List, Sequence, Tuple

import torch

__all__ = ["SampleOrder"]

Key = Tuple[int, int]


def _generator(*parts: object) -> torch.Generator:
    # A stable seed from the parts: Python's hash() of a str changes between processes.
    seed = zlib.crc32(repr(parts).encode()) | (zlib.adler32(repr(parts).encode()) << 32)
    return torch.Generator().manual_seed(seed)


def _apportion(total: int, weights: Sequence[float]) -> List[int]:
    """Integers proportional to `weights` summing to `total` (largest remainder)."""
    wsum = float(sum(weights))
    exact = [total * w / wsum for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


class SampleOrder:
    def __init__(
        self,
        source_sizes: Sequence[int],
        weights: Sequence[float],
        *,
        seed: int,
        modality: str,
        validation_size: int = 0,
        dp_rank: int = 0,
        dp_size: int = 1,
    ):
        if len(source_sizes) != len(weights) or not source_sizes:
            raise ValueError(f"{modality}: need one weight per source, got {len(source_sizes)} sources and {len(weights)} weights")
        if any(w <= 0 for w in weights):
            raise ValueError(f"{modality}: source weights must be > 0, got {list(weights)}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")
        self.modality, self.seed = modality, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.weights = list(weights)
        held_out = _apportion(validation_size, weights)
        self._valid: List[torch.Tensor] = []
        self._train: List[torch.Tensor] = []
        for i, (size, n_valid) in enumerate(zip(source_sizes, held_out)):
            if size == 0:
                raise ValueError(f"{modality}: source {i} has no training samples; drop it from the blend or add data")
            if n_valid >= size:
                raise ValueError(
                    f"{modality}: source {i} has {size} samples but {n_valid} of them would be held out for "
                    f"validation (validation size {validation_size} split by weight); lower the validation size"
                )
            perm = torch.randperm(size, generator=_generator(seed, modality, i, "validation"))
            self._valid.append(perm[:n_valid].sort().values)
            self._train.append(perm[n_valid:].sort().values)
        self.epoch_size = sum(t.numel() for t in self._train)
        if self.epoch_size < dp_size:
            raise ValueError(f"{modality}: {self.epoch_size} training samples cannot be sharded over {dp_size} DP ranks")

    def validation_keys(self) -> List[Key]:
        """This DP rank's share of the held-out set (source-major order)."""
        keys = [(i, int(j)) for i, idx in enumerate(self._valid) for j in idx]
        return keys[self.dp_rank::self.dp_size]

    def epoch_keys(self, epoch: int) -> torch.Tensor:
        """This DP rank's shard of epoch `epoch` in reading order: int64 [n, 2] rows of
        (source, index) -- a tensor, not a list, since an epoch may hold millions of samples."""
        counts = _apportion(self.epoch_size, self.weights)
        parts = []
        for i, (pool, n) in enumerate(zip(self._train, counts)):
            # Successive permutations of the pool, continued across epochs: draw `n` starting at
            # (epoch * n) of the endless sequence, so a re-read source cycles through all its samples.
            start, chosen = epoch * n, []
            while n > 0:
                cycle, offset = divmod(start, pool.numel())
                perm = pool[torch.randperm(pool.numel(), generator=_generator(self.seed, self.modality, i, "cycle", cycle))]
                take = perm[offset:offset + n]
                chosen.append(take)
                start += take.numel()
                n -= take.numel()
            idx = torch.cat(chosen) if chosen else torch.empty(0, dtype=torch.int64)
            parts.append(torch.stack([torch.full_like(idx, i), idx], dim=1))
        keys = torch.cat(parts)
        keys = keys[torch.randperm(keys.shape[0], generator=_generator(self.seed, self.modality, "epoch", epoch))]
        return keys[self.dp_rank::self.dp_size].contiguous()
