"""Prompts -> one left-padded batch: token ids, validity, M-RoPE positions, the media of all rows.

Left padding: every row's last prompt token sits in the last column, so a static KV cache (one
`sequence_len_offset` for the whole batch) appends each row's new token in the same column and the
prefill's last-position logits are every row's next-token logits.  Pad columns are masked as keys
(`prefill_attention_mask` / `decode_attention_mask`).  Plain RoPE only sees cache columns: a row
shifted right by its padding keeps the same *relative* positions, which is all RoPE depends on.
M-RoPE ids are computed per row on the unpadded prompt, exactly as the training data path does
(`data.sample_builder`), and continued during decoding with the `deltas` rule (`models/rope.py`):
the j-th new token of a row sits at ``n_valid + delta + j = max_prompt_position + 1 + j`` on all
three axes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["PromptMedia", "PromptBatch", "build_prompt_batch", "prefill_attention_mask", "decode_attention_mask"]


@dataclass
class PromptMedia:
    """One prompt's media, in the `OmniSample` layout (token order inside the prompt): the prompt's
    ``<image_pad>``/``<video_pad>``/``<audio_pad>`` runs must already be expanded to the encoder
    token counts (`data.sample_builder` / `ChatTemplate.render_prompt` do this)."""

    pixel_values: Optional[Tensor] = None
    image_grid_thw: Optional[Tensor] = None
    pixel_values_videos: Optional[Tensor] = None
    video_grid_thw: Optional[Tensor] = None
    audio_features: Optional[Tensor] = None  # [n_audio, T_max, F]
    audio_lengths: Optional[Tensor] = None

    @classmethod
    def from_sample(cls, sample) -> "PromptMedia":
        """The media fields of an `OmniSample` (or anything with the same attribute names)."""
        return cls(**{f.name: getattr(sample, f.name, None) for f in fields(cls)})


@dataclass
class PromptBatch:
    tokens: Tensor  # [B, S] int64, left padded
    valid: Tensor  # [B, S] bool, False on padding
    lengths: List[int]  # valid prompt tokens per row
    position_ids: Optional[Tensor] = None  # [3, B, S] M-RoPE ids (omni model), None for plain RoPE
    next_position: Optional[Tensor] = None  # [B] M-RoPE id of each row's first new token
    media: Dict[str, object] = field(default_factory=dict)  # OmniModel.embed_multimodal keywords

    def decode_positions(self, step: int) -> Tensor:
        """[3, B, 1] M-RoPE ids of the new tokens fed at decode step `step` (0 = the first sampled token)."""
        return (self.next_position + step).view(1, -1, 1).expand(3, -1, 1)


def _cat(items: List[Tensor]) -> Optional[Tensor]:
    return torch.cat(items) if items else None


def _batch_media(media: Sequence[Optional[PromptMedia]]) -> Dict[str, object]:
    """All rows' media in row order (what `OmniModel.embed_multimodal` scatters row-major)."""
    out: Dict[str, object] = {}
    for name in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        value = _cat([getattr(m, name) for m in media if m is not None and getattr(m, name) is not None])
        if value is not None:
            out[name] = value.long() if name.endswith("grid_thw") else value.float()
    clips = [(m.audio_features, m.audio_lengths) for m in media if m is not None and m.audio_features is not None]
    if clips:
        t_max = max(int(f.shape[1]) for f, _ in clips)
        feats = torch.zeros(sum(int(f.shape[0]) for f, _ in clips), t_max, int(clips[0][0].shape[2]))
        row = 0
        for f, _ in clips:
            feats[row:row + f.shape[0], :f.shape[1]] = f.float()
            row += f.shape[0]
        out["audio_features"] = feats
        out["audio_lengths"] = torch.cat([lengths.long() for _, lengths in clips])
    return out


def _check_media(i: int, ids: Tensor, m: Optional[PromptMedia], vocab) -> None:
    """One clear error when a prompt's placeholders and its media disagree."""
    for kind, pad_id, present in (("image", vocab.image_pad_id, m is not None and m.pixel_values is not None),
                                  ("video", vocab.video_pad_id, m is not None and m.pixel_values_videos is not None),
                                  ("audio", vocab.audio_pad_id, m is not None and m.audio_features is not None)):
        n = int((ids == pad_id).sum())
        if n and not present:
            raise ValueError(f"prompt {i} has {n} <{kind}_pad> tokens but no {kind} media; pass its PromptMedia "
                             f"(media[{i}]) or remove the placeholders")
        if present and not n:
            raise ValueError(f"prompt {i} carries {kind} media but no <{kind}_pad> tokens; render the prompt with "
                             "ChatTemplate.render_prompt so each medium gets its placeholder span")


def build_prompt_batch(prompts: Sequence[Sequence[int]], media: Optional[Sequence[Optional[PromptMedia]]], *,
                       vocab_size: int, pad_id: int, omni=None) -> PromptBatch:
    """Left-padded batch of `prompts` (token-id lists).  `omni`: the OmniModel (for its vocabulary
    and spatial merge size: M-RoPE ids and media), None for a plain Llama GPTModel."""
    if not prompts:
        raise ValueError("generate: no prompts given")
    if media is not None and len(media) != len(prompts):
        raise ValueError(f"generate: {len(media)} media entries for {len(prompts)} prompts; "
                         "give one (or None) per prompt")
    rows = []
    for i, p in enumerate(prompts):
        ids = torch.as_tensor(list(p), dtype=torch.long)
        if ids.ndim != 1 or ids.numel() == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"prompt {i} has token ids in [{lo}, {hi}] outside the model vocabulary [0, {vocab_size})")
        rows.append(ids)
    B, S = len(rows), max(r.numel() for r in rows)
    tokens = torch.full((B, S), pad_id, dtype=torch.long)
    valid = torch.zeros(B, S, dtype=torch.bool)
    for b, ids in enumerate(rows):
        tokens[b, S - ids.numel():] = ids
        valid[b, S - ids.numel():] = True
    batch = PromptBatch(tokens=tokens, valid=valid, lengths=[r.numel() for r in rows])
    if omni is None:
        if media is not None and any(m is not None for m in media):
            raise ValueError("generate: media given but the model is a plain Llama GPTModel (no encoders); "
                             "load an omni checkpoint for image/video/audio prompts")
        return batch

    from megatron_omni.models.rope import mrope_position_ids

    vocab = omni.vocab
    merge = omni.omni.vision.spatial_merge_size if omni.omni.vision is not None else 1
    media = list(media) if media is not None else [None] * B
    position_ids = torch.zeros(3, B, S, dtype=torch.long)
    next_position = torch.zeros(B, dtype=torch.long)
    for b, (ids, m) in enumerate(zip(rows, media)):
        _check_media(b, ids, m, vocab)
        pos, delta = mrope_position_ids(
            ids[None], m.image_grid_thw if m is not None else None, m.video_grid_thw if m is not None else None,
            image_token_id=vocab.image_pad_id, video_token_id=vocab.video_pad_id, spatial_merge_size=merge)
        position_ids[:, b, S - ids.numel():] = pos[:, 0]
        next_position[b] = ids.numel() + int(delta)
    batch.position_ids, batch.next_position = position_ids, next_position
    batch.media = _batch_media(media)
    # Host-side placeholder counts: the model checks its encoders against them without a device sync.
    batch.media["placeholder_counts"] = {pid: int((tokens == pid).sum()) for pid in vocab.placeholder_ids}
    return batch


def prefill_attention_mask(valid: Tensor) -> Tensor:
    """[B, 1, S, S] bool, True = masked: causal, and no row attends to its padding columns."""
    S = valid.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=valid.device).triu(1)
    return causal[None, None] | ~valid[:, None, None, :]


def decode_attention_mask(valid: Tensor) -> Tensor:
    """[B, 1, 1, L] bool for one new token attending to all L cached columns but the padding."""
    return ~valid[:, None, None, :]
