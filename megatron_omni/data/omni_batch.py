"""One rendered sample, and the microbatch the omni model consumes (packed rows + media).

`OmniSample` is what the sample builder (manifest row -> chat template -> decoded media) yields;
the packer concatenates samples into the fixed-length rows of an `OmniMicrobatch`.

Contract between `megatron_omni.data` (which builds it) and `megatron_omni.models.omni`
(which consumes it); every pipeline microbatch has the same [B, S] shape.

* ``tokens`` [B, S] int64: text ids with every medium's placeholder span already expanded to the
  number of encoder tokens it yields (``<image_pad>`` x t*h*w/m^2 per image, ``<video_pad>`` per
  video, ``<audio_pad>`` x ``audio_token_count(frames)`` per clip), inside the medium's
  ``<image>``/``</image>`` (etc.) markers.  Media appear in the tensors below in token order
  (row-major over the batch).
* ``labels`` [B, S] int64: next-token target of every position; ``loss_mask`` [B, S] float32 is 1
  exactly on positions whose target is a discrete output token (paper Eq. 1).
* ``position_ids`` [3, B, S] int64: M-RoPE (t, h, w) ids, restarting at 0 in every packed sample.
* ``cu_seqlens`` int32 [n_segments + 1]: segment boundaries over the flattened B*S token stream;
  a boundary at every row start, every packed sample is a segment, a row's padding tail is a
  segment of its own.  Attention never crosses a boundary.
* ``pixel_values`` [N, C*T*P*P] float32 + ``image_grid_thw`` [n_images, 3] (Qwen2-VL patch layout,
  normalized); ``pixel_values_videos`` / ``video_grid_thw`` the same for videos.
* ``audio_features`` [n_audio, T_max, F] float32 (log-mel fbank, zero padded) + ``audio_lengths``
  [n_audio] int64 valid frames.
* ``modality``: the modality this microbatch carries (the scheduler's unit, paper Sec. 3.1).
* ``sample_ids``: host metadata, never copied to the device: per row, the ``sample_id`` of each
  packed sample in order (manifest ``path:line (id)``), for the loss-spike log.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor


@dataclass
class OmniSample:
    """One sample, unpacked: the same fields as `OmniMicrobatch` for a single sequence of length L.

    ``tokens`` / ``labels`` [L] int64, ``loss_mask`` [L] float32, ``position_ids`` [3, L] int64
    starting at 0; media tensors as in `OmniMicrobatch` (only this sample's media, token order).
    ``labels[i]`` is the target of position i (the next token; the last position's target is
    masked).  ``sample_id`` names the manifest row (``path:line`` or its ``id``) for error messages.
    """

    tokens: Tensor
    labels: Tensor
    loss_mask: Tensor
    position_ids: Tensor
    pixel_values: Optional[Tensor] = None
    image_grid_thw: Optional[Tensor] = None
    pixel_values_videos: Optional[Tensor] = None
    video_grid_thw: Optional[Tensor] = None
    audio_features: Optional[Tensor] = None  # [n_audio, T_max, F]
    audio_lengths: Optional[Tensor] = None
    modality: str = "text"
    sample_id: str = ""

    def __len__(self) -> int:
        return self.tokens.numel()


@dataclass
class OmniMicrobatch:
    tokens: Tensor
    labels: Tensor
    loss_mask: Tensor
    position_ids: Tensor
    cu_seqlens: Tensor
    pixel_values: Optional[Tensor] = None
    image_grid_thw: Optional[Tensor] = None
    pixel_values_videos: Optional[Tensor] = None
    video_grid_thw: Optional[Tensor] = None
    audio_features: Optional[Tensor] = None
    audio_lengths: Optional[Tensor] = None
    modality: str = "text"
    # {placeholder token id: occurrences in tokens}, python ints counted on the host when the
    # microbatch is built (`count_placeholders`): the model checks its encoders' token counts
    # against them without reading device memory.
    placeholder_counts: Optional[Dict[int, int]] = field(default=None, compare=False)
    # [row][segment] the packed samples' ids (OmniSample.sample_id), None when the builder has none
    sample_ids: Optional[List[List[str]]] = field(default=None, compare=False)

    def __post_init__(self):
        B, S = self.tokens.shape
        for name in ("labels", "loss_mask"):
            if getattr(self, name).shape != (B, S):
                raise ValueError(f"{name} shape {tuple(getattr(self, name).shape)} != tokens {(B, S)}")
        if self.position_ids.shape != (3, B, S):
            raise ValueError(f"position_ids shape {tuple(self.position_ids.shape)} != {(3, B, S)}")
        cu = self.cu_seqlens
        if cu.dim() != 1 or int(cu[0]) != 0 or int(cu[-1]) != B * S or bool((cu[1:] <= cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must rise strictly from 0 to B*S={B * S}, got {cu.tolist()}")
        row_starts = torch.arange(B, dtype=cu.dtype) * S
        if not bool(torch.isin(row_starts, cu.cpu()).all()):
            raise ValueError("cu_seqlens must have a boundary at every row start")

    def count_placeholders(self, ids: Sequence[int]) -> Dict[int, int]:
        """{id: occurrences in tokens} for `ids`, counted once (one host read; call it where the
        microbatch is built, on its host tensors) and kept in `placeholder_counts`."""
        have = self.placeholder_counts or {}
        missing = [i for i in ids if i not in have]
        if missing:
            wanted = torch.tensor(missing, dtype=self.tokens.dtype, device=self.tokens.device)
            counts = (self.tokens.reshape(-1, 1) == wanted).sum(0).tolist()
            self.placeholder_counts = have = {**have, **dict(zip(missing, counts))}
        return {i: have[i] for i in ids}

    def media_inputs(self) -> Dict[str, object]:
        """The first pipeline stage's keywords of `OmniModel.embed_multimodal` (media and their sizes)."""
        return dict(pixel_values=self.pixel_values, image_grid_thw=self.image_grid_thw,
                    pixel_values_videos=self.pixel_values_videos, video_grid_thw=self.video_grid_thw,
                    audio_features=self.audio_features, audio_lengths=self.audio_lengths,
                    placeholder_counts=self.placeholder_counts)

    @property
    def max_seqlen(self) -> int:
        return int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())

    def segment_ids(self) -> Tensor:
        """[B, S] index of the packed segment every token belongs to."""
        lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths,
                                      output_size=self.tokens.numel())
        return seg.view(self.tokens.shape)

    def to(self, device, non_blocking: bool = False, only: Optional[Iterable[str]] = None) -> "OmniMicrobatch":
        """A copy with the tensor fields in `only` (default: all) on `device`; the other fields keep
        their tensors where they are (no copy).  Not re-validated: the fields were checked when the
        microbatch was built, and validating reads cu_seqlens on the host (a device sync)."""
        names = {f.name for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}
        if only is not None:
            names &= set(only)
        return self.with_tensors(**{n: getattr(self, n).to(device, non_blocking=non_blocking) for n in names})

    def with_tensors(self, **tensors: Tensor) -> "OmniMicrobatch":
        """A shallow copy with the given fields replaced, without re-running `__post_init__`
        (for copies of a validated microbatch: device moves, pinning)."""
        out = copy.copy(self)
        for name, value in tensors.items():
            setattr(out, name, value)
        return out
