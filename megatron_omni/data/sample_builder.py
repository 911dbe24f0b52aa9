"""Manifest row -> `OmniSample`: decode media, render the chat template, labels, loss mask, M-RoPE ids.

Placeholder lengths come from the model's own rules - `merged_token_counts` (vision) and
`audio_token_count` (audio) - applied to what the media loaders return, so the number of
``<*_pad>`` tokens always equals the number of encoder outputs the model will scatter into them.
`MediaError` from a loader propagates: the loader skips and counts that sample.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch

from megatron_omni.data.chat_template import ChatTemplate, MediaRef, Rendered, TemplateError, Turn, media_refs
from megatron_omni.data.manifest import ManifestRow
from megatron_omni.data.media import load_audio, load_image, load_video
from megatron_omni.data.omni_batch import OmniSample
from megatron_omni.data.tokenizer import ChatTokenizer
from megatron_omni.config.encoders import AudioConfig, VisionConfig, audio_token_count
from megatron_omni.models.omni_vocab import OmniVocab
from megatron_omni.models.rope import mrope_position_ids
from megatron_omni.models.vision.encoder import merged_token_counts

__all__ = ["DecodedMedia", "build_sample", "build_preference_pair", "decode_media", "rendered_sample"]


class DecodedMedia:
    """A row's media, decoded, in reference order, with the LLM tokens each one yields."""

    def __init__(self) -> None:
        self.token_counts: List[int] = []
        self.pixel_values: List[torch.Tensor] = []
        self.image_grid_thw: List[torch.Tensor] = []
        self.pixel_values_videos: List[torch.Tensor] = []
        self.video_grid_thw: List[torch.Tensor] = []
        self.audio: List[torch.Tensor] = []  # [frames, F] each

    def sample_fields(self) -> dict:
        out = {}
        if self.pixel_values:
            out["pixel_values"] = torch.cat(self.pixel_values)
            out["image_grid_thw"] = torch.cat(self.image_grid_thw).long()
        if self.pixel_values_videos:
            out["pixel_values_videos"] = torch.cat(self.pixel_values_videos)
            out["video_grid_thw"] = torch.cat(self.video_grid_thw).long()
        if self.audio:
            lengths = torch.tensor([a.shape[0] for a in self.audio], dtype=torch.long)
            feats = torch.zeros(len(self.audio), int(lengths.max()), self.audio[0].shape[1], dtype=torch.float32)
            for i, a in enumerate(self.audio):
                feats[i, : a.shape[0]] = a
            out["audio_features"], out["audio_lengths"] = feats, lengths
        return out


def _contents(row: ManifestRow) -> List[str]:
    return [row.text] if row.text is not None else [t.content for t in row.conversations]


def decode_media(row: ManifestRow, *, root: str, vision: VisionConfig, audio: AudioConfig, max_image_tokens: int,
                 max_video_frames: Optional[int], max_video_tokens: Optional[int] = None) -> DecodedMedia:
    """Decode every medium `row` references (paths relative to `root`), in order."""
    out = DecodedMedia()
    m = vision.spatial_merge_size
    refs: List[MediaRef] = [r for c in _contents(row) for r in media_refs(c)]
    for ref in refs:
        path = os.path.join(root, ref.path)
        if ref.kind == "image":
            item = load_image(path, vision=vision, max_tokens=max_image_tokens)
            out.pixel_values.append(item.pixel_values)
            out.image_grid_thw.append(item.grid_thw)
            out.token_counts.append(int(merged_token_counts(item.grid_thw, m).sum()))
        elif ref.kind == "video":
            if not max_video_frames:
                raise TemplateError(f"{row.where}: video {ref.path!r} in a stage without video (max_video_frames unset)")
            item = load_video(path, vision=vision, max_frames=max_video_frames,
                              max_tokens=max_video_tokens or max_image_tokens)
            out.pixel_values_videos.append(item.pixel_values)
            out.video_grid_thw.append(item.grid_thw)
            out.token_counts.append(int(merged_token_counts(item.grid_thw, m).sum()))
        else:
            feats = load_audio(path, audio=audio)
            out.audio.append(feats)
            out.token_counts.append(int(audio_token_count(int(feats.shape[0]), audio)))
    return out


def _to_sample(rendered: Rendered, media: DecodedMedia, row: ManifestRow, vocab: OmniVocab,
               vision: VisionConfig) -> OmniSample:
    tokens = torch.tensor(rendered.tokens, dtype=torch.long)
    labels, loss_mask = rendered.labels_and_loss_mask()
    fields = media.sample_fields()
    # Audio pads are ordinary (linear) positions, like text: only image / video runs are 3D.
    position_ids, _ = mrope_position_ids(
        tokens[None], fields.get("image_grid_thw"), fields.get("video_grid_thw"),
        image_token_id=vocab.image_pad_id, video_token_id=vocab.video_pad_id,
        spatial_merge_size=vision.spatial_merge_size,
    )
    return OmniSample(
        tokens=tokens, labels=torch.tensor(labels, dtype=torch.long),
        loss_mask=torch.tensor(loss_mask, dtype=torch.float32), position_ids=position_ids[:, 0],
        modality=row.modality, sample_id=f"{row.where} ({row.id})", **fields,
    )


def rendered_sample(rendered: Rendered, media: DecodedMedia, row: ManifestRow, vocab: OmniVocab,
                    vision: VisionConfig) -> OmniSample:
    """An already rendered conversation as a sample (GSPO: a prompt + sampled response ids)."""
    return _to_sample(rendered, media, row, vocab, vision)


def _render(template: ChatTemplate, row: ManifestRow, turns: Optional[List[Turn]], counts: List[int]) -> Rendered:
    try:
        if row.text is not None:
            return template.render_document(row.text, counts)
        return template.render(turns, counts)
    except (TemplateError, ValueError) as err:
        raise TemplateError(f"{row.where} ({row.id}): {err}") from None


def build_sample(row: ManifestRow, *, root: str, tokenizer: ChatTokenizer, vocab: OmniVocab, vision: VisionConfig,
                 audio: AudioConfig, max_image_tokens: int, max_video_frames: Optional[int],
                 max_video_tokens: Optional[int] = None, template: Optional[ChatTemplate] = None) -> OmniSample:
    """One training sample.  DPO rows need `build_preference_pair`.

    `max_video_tokens` bounds a whole clip's LLM tokens (None = `max_image_tokens`); pass a
    shared `template` to avoid re-encoding the header strings per sample.
    """
    if row.task == "dpo":
        raise TemplateError(f"{row.where} ({row.id}): a dpo row is a preference pair; use build_preference_pair")
    template = template or ChatTemplate(tokenizer, vocab)
    media = decode_media(row, root=root, vision=vision, audio=audio, max_image_tokens=max_image_tokens,
                         max_video_frames=max_video_frames, max_video_tokens=max_video_tokens)
    return _to_sample(_render(template, row, row.conversations, media.token_counts), media, row, vocab, vision)


def build_preference_pair(row: ManifestRow, *, root: str, tokenizer: ChatTokenizer, vocab: OmniVocab,
                          vision: VisionConfig, audio: AudioConfig, max_image_tokens: int,
                          max_video_frames: Optional[int], max_video_tokens: Optional[int] = None,
                          template: Optional[ChatTemplate] = None) -> Tuple[OmniSample, OmniSample]:
    """(chosen, rejected) samples of a DPO row: the shared prompt + each answer (media decoded once)."""
    if row.task != "dpo":
        raise TemplateError(f"{row.where} ({row.id}): task {row.task!r} is not a preference pair; use build_sample")
    template = template or ChatTemplate(tokenizer, vocab)
    media = decode_media(row, root=root, vision=vision, audio=audio, max_image_tokens=max_image_tokens,
                         max_video_frames=max_video_frames, max_video_tokens=max_video_tokens)
    pair = []
    for answer in (row.chosen, row.rejected):
        turns = list(row.conversations) + [Turn("assistant", answer)]
        pair.append(_to_sample(_render(template, row, turns, media.token_counts), media, row, vocab, vision))
    return pair[0], pair[1]
