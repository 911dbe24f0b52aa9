"""Preference pairs (paper Sec. 2.2 alignment tuning, Eq. 2: x_chosen, x_rejected) as microbatches.

Each row of a ``preference`` microbatch holds one pair: the chosen sample then the rejected one,
two packed segments (attention never crosses them), then padding -- so the last pipeline stage can
read both sequence log-probabilities of a pair from one row
(`training/tasks/alignment.py::preference_loss`).
Order, DP sharding and resume follow `SampleOrder` like every other modality stream; a pair whose
media fail to decode or that does not fit a row is skipped and counted.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable, Dict, List, Tuple

from megatron_omni.data.modality_stream import LoaderConfig
from megatron_omni.data.omni_batch import OmniMicrobatch, OmniSample
from megatron_omni.data.packing import collate_rows
from megatron_omni.data.sample_order import SampleOrder

log = logging.getLogger(__name__)

PREFERENCE = "preference"


class PreferenceStream:
    def __init__(self, rows: List[Any], build_pair: Callable[[Any], Tuple[OmniSample, OmniSample]],
                 config: LoaderConfig, *, dp_rank: int = 0, dp_size: int = 1):
        if not rows:
            raise ValueError("preference stream: no DPO rows in the blend's preference sources")
        self.rows, self.build_pair, self.config = rows, build_pair, config
        self.order = SampleOrder([len(rows)], [1.0], seed=config.seed, modality=PREFERENCE,
                                 dp_rank=dp_rank, dp_size=dp_size)
        self.epoch, self.cursor = 0, 0
        self._keys = self.order.epoch_keys(0)
        self.skipped: Counter = Counter()
        self._logged = set()

    @property
    def modalities(self) -> List[str]:
        return [PREFERENCE]

    def _next_pair(self) -> Tuple[OmniSample, OmniSample]:
        tried = 0
        while True:
            tried += 1
            if tried > max(1, self._keys.shape[0]) + 1:  # a whole epoch of this rank's pairs unusable
                raise RuntimeError(
                    f"preference stream: none of this rank's {self._keys.shape[0]} pairs is usable "
                    f"(skipped: {dict(self.skipped)}); for 'too_long' raise data.seq_length above "
                    f"{self.config.seq_length} (a row holds chosen + rejected) or lower max_image_tokens")
            if self.cursor >= self._keys.shape[0]:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._keys = self.order.epoch_keys(self.epoch)
            row = self.rows[int(self._keys[self.cursor, 1])]
            self.cursor += 1
            try:
                chosen, rejected = self.build_pair(row)
            except Exception as exc:  # corrupt media etc.: skip, count, name it once
                self._skip(row, type(exc).__name__, exc)
                continue
            if len(chosen) + len(rejected) > self.config.seq_length:
                self._skip(row, "too_long", None)
                continue
            return chosen, rejected

    def _skip(self, row, reason: str, exc) -> None:
        self.skipped[reason] += 1
        where = getattr(row, "where", "?")
        if (where, reason) not in self._logged:
            self._logged.add((where, reason))
            log.warning("skipping preference pair %s: %s%s", where, reason, f" ({exc})" if exc else "")

    def next_microbatch(self, modality: str = PREFERENCE) -> OmniMicrobatch:
        rows = [list(self._next_pair()) for _ in range(self.config.micro_batch_size)]
        return collate_rows(rows, self.config.seq_length, pad_token_id=self.config.pad_token_id, modality=PREFERENCE)

    def validation_microbatches(self, modality: str = PREFERENCE) -> List[OmniMicrobatch]:
        return []  # DPO is not part of the adaptive-balance validation (Sec. 3.2 balances understanding tasks)

    @property
    def skipped_samples(self) -> int:
        return sum(self.skipped.values())

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._keys = self.order.epoch_keys(self.epoch)
        self.skipped = Counter(state["skipped"])


class WithPreferences:
    """An `OmniLoader` plus a `PreferenceStream` behind one `next_microbatch(modality)`."""

    def __init__(self, loader, preferences: PreferenceStream):
        self.loader, self.preferences = loader, preferences

    @property
    def modalities(self) -> List[str]:
        return list(self.loader.modalities) + [PREFERENCE]

    def _of(self, modality: str):
        return self.preferences if modality == PREFERENCE else self.loader

    def next_microbatch(self, modality: str) -> OmniMicrobatch:
        return self._of(modality).next_microbatch(modality)

    def validation_microbatches(self, modality: str) -> List[OmniMicrobatch]:
        return self._of(modality).validation_microbatches(modality)

    @property
    def skipped_samples(self) -> int:
        return self.loader.skipped_samples + self.preferences.skipped_samples

    def skipped_by_modality(self) -> Dict[str, int]:
        return {**self.loader.skipped_by_modality(), PREFERENCE: self.preferences.skipped_samples}

    def bad_samples(self) -> Dict[str, int]:
        return self.loader.bad_samples()  # pairs are not remembered (a pair is read once per epoch)

    def pause_prefetch(self) -> None:
        self.loader.pause_prefetch()

    def state_dict(self) -> Dict[str, Any]:
        return {"loader": self.loader.state_dict(), PREFERENCE: self.preferences.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
        self.preferences.load_state_dict(state[PREFERENCE])
