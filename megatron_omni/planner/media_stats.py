"""Measure a stage's `MediaAssumptions` on its data instead of assuming them.

Builds the stage's own omni loader (`training/omni_data.build_blend_loader`, one process, DP 1)
and reads packed microbatches of every media modality: the share of row positions that are
encoder outputs (`<image_pad>` / `<video_pad>` / `<audio_pad>`), and the mean audio clip length
(fbank frames at 100 per second).  `tools/plan.py --media-from-data` uses it.
"""

from __future__ import annotations

import logging
from typing import Dict, List

import torch

from megatron_omni.config.loader import ConfigError
from megatron_omni.config.schema import RunConfig
from megatron_omni.planner.omni import FBANK_FRAMES_PER_S, MEDIA_ENCODER, MediaAssumptions

log = logging.getLogger(__name__)


def measure_media(cfg: RunConfig, microbatches: int = 4) -> MediaAssumptions:
    """`MediaAssumptions` measured on `microbatches` packed microbatches per media modality."""
    from megatron_omni.convert.mcore_io import megatron_world
    from megatron_omni.models.omni import omni_vocab
    from megatron_omni.training.omni_data import build_blend_loader

    if cfg.omni is None or cfg.data.mock:
        raise ConfigError("--media-from-data needs an omni stage config with real data (data.omni_blend, data.root)")
    vocab = omni_vocab(cfg.model, cfg.omni)
    pads = torch.tensor([vocab.image_pad_id, vocab.video_pad_id, vocab.audio_pad_id])
    fractions: Dict[str, float] = {}
    clip_frames: List[torch.Tensor] = []
    with megatron_world():
        loader, _ = build_blend_loader(cfg, vocab, dp_rank=0)
        try:
            for modality in (m for m in loader.modalities if m in MEDIA_ENCODER):
                media = total = 0
                for _ in range(microbatches):
                    batch = loader.next_microbatch(modality)
                    media += int(torch.isin(batch.tokens, pads).sum())
                    total += batch.tokens.numel()
                    if batch.audio_lengths is not None:
                        clip_frames.append(batch.audio_lengths.float())
                fractions[modality] = media / total
        finally:
            loader.pause_prefetch()
    seconds = float(torch.cat(clip_frames).mean()) / FBANK_FRAMES_PER_S if clip_frames else None
    log.info("media measured on %d microbatches per modality: %s, audio clips %s s", microbatches, fractions,
             "n/a" if seconds is None else f"{seconds:.1f}")
    return MediaAssumptions(media_fraction=fractions, **({} if seconds is None else {"audio_seconds": seconds}),
                            source=f"measured on {microbatches} microbatches per modality of {cfg.data.root}")
