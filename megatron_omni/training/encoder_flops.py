"""Training FLOPs of the omni encoders for the media of a microbatch (Megatron-LM conventions of
`training/flops.py`: matmuls only, 2 FLOPs per multiply-add, backward = 2 x forward).

Vision (NaViT): attention is bidirectional inside each frame's segment (`vision_cu_seqlens`),
MLP ungated, then the 2x2 merge MLP on N/4 tokens.  Audio (Whisper-style / SAN-M): bidirectional
attention over each clip's encoder frames, ungated MLP, connector on the merged tokens.  Convs
and norms are not counted (as Megatron-LM leaves out norms and the embedding lookup).  Frozen
encoders still run forward; their backward (activation gradients only when a later module
trains) is counted like a trainable module's for simplicity and stated so in MFU reports.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_omni.models.audio.config import AudioConfig, audio_token_count, encoder_frame_count
from megatron_omni.models.vision.config import VisionConfig
from megatron_omni.training.flops import FMA_FACTOR, FWD_BWD_FACTOR, attention_forward_flops, mlp_forward_flops


def _encoder_layer_flops(segment_lengths: torch.Tensor, *, width: int, heads: int, ffn: int) -> float:
    """One bidirectional encoder layer (MHA + ungated MLP) over segments of these lengths."""
    n, sum_sq = int(segment_lengths.sum()), int((segment_lengths.long() ** 2).sum())
    return attention_forward_flops(n, sum_sq, hidden_size=width, num_attention_heads=heads, num_query_groups=heads,
                                   head_dim=width // heads, causal=False) + \
        mlp_forward_flops(n, hidden_size=width, ffn_hidden_size=ffn, gated=False)


def vision_forward_flops(cfg: VisionConfig, grid_thw: torch.Tensor) -> float:
    grid = grid_thw.long()
    frame_tokens = (grid[:, 1] * grid[:, 2]).repeat_interleave(grid[:, 0])
    n, d = int(frame_tokens.sum()), cfg.hidden_size
    per_layer = _encoder_layer_flops(frame_tokens, width=d, heads=cfg.num_attention_heads, ffn=cfg.ffn_hidden_size)
    patch_embed = FMA_FACTOR * n * cfg.patch_dim * d
    merged = n // cfg.spatial_merge_size ** 2
    merger = FMA_FACTOR * merged * cfg.merge_width * (cfg.merge_width + cfg.out_hidden_size)
    return float(cfg.depth * per_layer + patch_embed + merger)


def audio_forward_flops(cfg: AudioConfig, frames: torch.Tensor) -> float:
    enc = encoder_frame_count(frames.long(), cfg)
    d = cfg.d_model
    per_layer = _encoder_layer_flops(enc, width=d, heads=cfg.num_attention_heads, ffn=cfg.ffn_hidden_size)
    tokens = int(audio_token_count(frames.long(), cfg).sum())
    hidden = cfg.connector_hidden_size or cfg.out_hidden_size
    connector = FMA_FACTOR * tokens * (cfg.downsample_factor * d * hidden + hidden * cfg.out_hidden_size)
    return float(cfg.num_layers * per_layer + connector)


def encoder_training_flops(vision: Optional[VisionConfig], audio: Optional[AudioConfig], batch) -> float:
    """Training FLOPs of the encoders + connectors for one `OmniMicrobatch`."""
    total = 0.0
    for grid in (batch.image_grid_thw, batch.video_grid_thw):
        if grid is not None and vision is not None:
            total += vision_forward_flops(vision, grid)
    if batch.audio_lengths is not None and audio is not None:
        total += audio_forward_flops(audio, batch.audio_lengths)
    return FWD_BWD_FACTOR * total
