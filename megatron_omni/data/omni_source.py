"""`OmniSource`: what the omni training data (`training/omni_data.py::OmniData`) reads from.

One DP rank's per-modality microbatch streams, packed to [micro_batch_size, seq_length]:
`data/omni_loader.py::OmniLoader` over a stage blend (with `data/preference_stream.py::
WithPreferences` when the blend has DPO pairs) and `data/mock_omni.py::MockOmniData` implement it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Protocol, runtime_checkable

from megatron_omni.data.omni_batch import OmniMicrobatch


@runtime_checkable
class OmniSource(Protocol):
    @property
    def modalities(self) -> List[str]:
        """The streams this source has (modality names; "preference" for DPO pairs)."""
        ...

    def next_microbatch(self, modality: str) -> OmniMicrobatch:
        """The modality's next training microbatch of this DP rank."""
        ...

    def validation_microbatches(self, modality: str) -> List[OmniMicrobatch]:
        """This DP rank's share of the modality's held-out set (the same list every call)."""
        ...

    @property
    def skipped_samples(self) -> int:
        """Training samples skipped so far on this rank (unreadable or too long), every occurrence."""
        ...

    def skipped_by_modality(self) -> Dict[str, int]:
        """`skipped_samples` per modality."""
        ...

    def bad_samples(self) -> Dict[str, int]:
        """Distinct unusable training samples found so far on this rank, per modality."""
        ...

    def pause_prefetch(self) -> None:
        """Stop background decoding before the process forks (megatron's checkpoint writer); the next
        `next_microbatch` resumes from the consumed position, so the sequence is unchanged."""
        ...

    def state_dict(self) -> Dict[str, Any]:
        """This DP rank's position: the microbatches after it are the ones not yet consumed."""
        ...

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...
