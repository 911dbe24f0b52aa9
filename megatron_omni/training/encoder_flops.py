"""Training FLOPs of the omni encoders for the media of a microbatch (Megatron-LM conventions of
`training/flops.py`: matmuls only, 2 FLOPs per multiply-add, backward = 2 x forward).

Vision (NaViT): attention is bidirectional inside each frame's segment (`vision_cu_seqlens`),
MLP ungated, then the 2x2 merge MLP on N/4 tokens.  Audio (Whisper-style / SAN-M): bidirectional
attention over each clip's encoder frames, ungated MLP, connector on the merged tokens.  Convs
and norms are not counted (as Megatron-LM leaves out norms and the embedding lookup).

Frozen modules (`omni.freeze`, paper Table 2) count the work training really needs
(`module_passes`): 3 x forward for a trainable module, 2 x (forward + activation gradient) for a
frozen one that a trainable module before it needs gradients through, 1 x (forward only) for a
frozen one with nothing trainable before it.  Activation recomputation is not counted (model
FLOPs).
"""

from __future__ import annotations

from typing import Dict

import torch

from megatron_omni.config.schema import OMNI_MODULES, OmniConfig
from megatron_omni.config.encoders import AudioConfig, VisionConfig, audio_token_count, encoder_frame_count
from megatron_omni.training.flops import FMA_FACTOR, FWD_BWD_FACTOR, attention_forward_flops, mlp_forward_flops


def _encoder_layer_flops(segment_lengths: torch.Tensor, *, width: int, heads: int, ffn: int) -> float:
    """One bidirectional encoder layer (MHA + ungated MLP) over segments of these lengths."""
    n, sum_sq = int(segment_lengths.sum()), int((segment_lengths.long() ** 2).sum())
    return attention_forward_flops(n, sum_sq, hidden_size=width, num_attention_heads=heads, num_query_groups=heads,
                                   head_dim=width // heads, causal=False) + \
        mlp_forward_flops(n, hidden_size=width, ffn_hidden_size=ffn, gated=False)


def vision_forward_flops_by_module(cfg: VisionConfig, grid_thw: torch.Tensor) -> Dict[str, float]:
    """{vision_encoder: patch embed + blocks, vision_connector: 2x2 merge MLP} for these grids."""
    grid = grid_thw.long()
    frame_tokens = (grid[:, 1] * grid[:, 2]).repeat_interleave(grid[:, 0])
    n, d = int(frame_tokens.sum()), cfg.hidden_size
    per_layer = _encoder_layer_flops(frame_tokens, width=d, heads=cfg.num_attention_heads, ffn=cfg.ffn_hidden_size)
    patch_embed = FMA_FACTOR * n * cfg.patch_dim * d
    merged = n // cfg.spatial_merge_size ** 2
    merger = FMA_FACTOR * merged * cfg.merge_width * (cfg.merge_width + cfg.out_hidden_size)
    return {"vision_encoder": float(cfg.depth * per_layer + patch_embed), "vision_connector": float(merger)}


def audio_forward_flops_by_module(cfg: AudioConfig, frames: torch.Tensor) -> Dict[str, float]:
    """{audio_encoder: encoder layers, audio_connector: frame-stacking MLP} for clips of these lengths."""
    enc = encoder_frame_count(frames.long(), cfg)
    d = cfg.d_model
    per_layer = _encoder_layer_flops(enc, width=d, heads=cfg.num_attention_heads, ffn=cfg.ffn_hidden_size)
    tokens = int(audio_token_count(frames.long(), cfg).sum())
    hidden = cfg.connector_hidden_size or cfg.out_hidden_size
    connector = FMA_FACTOR * tokens * (cfg.downsample_factor * d * hidden + hidden * cfg.out_hidden_size)
    return {"audio_encoder": float(cfg.num_layers * per_layer), "audio_connector": float(connector)}


def vision_forward_flops(cfg: VisionConfig, grid_thw: torch.Tensor) -> float:
    return sum(vision_forward_flops_by_module(cfg, grid_thw).values())


def audio_forward_flops(cfg: AudioConfig, frames: torch.Tensor) -> float:
    return sum(audio_forward_flops_by_module(cfg, frames).values())


# Data flow of the omni model: the modules whose outputs each module consumes.
UPSTREAM = {
    "vision_encoder": (), "vision_connector": ("vision_encoder",),
    "audio_encoder": (), "audio_connector": ("audio_encoder",),
    "llm": tuple(m for m in OMNI_MODULES if m != "llm"),
}


def module_trains(module: str, omni: OmniConfig) -> bool:
    """Whether an OMNI_MODULES entry is in the model and not frozen (`omni.freeze`)."""
    present = {"vision": omni.vision is not None, "audio": omni.audio is not None}.get(module.split("_")[0], True)
    return present and module not in omni.freeze


def module_passes(module: str, omni: OmniConfig, lora: bool = False) -> int:
    """Forward-pass equivalents of training work for one module (see the module docstring);
    LoRA adapters make a frozen LLM carry gradients."""
    if module_trains(module, omni):
        return FWD_BWD_FACTOR
    if (module == "llm" and lora) or any(module_trains(u, omni) for u in UPSTREAM[module]):
        return 2
    return 1


def encoder_training_flops(omni: OmniConfig, batch, lora: bool = False) -> float:
    """Training FLOPs of the encoders + connectors for one `OmniMicrobatch`."""
    per_module: Dict[str, float] = {}
    for grid in (batch.image_grid_thw, batch.video_grid_thw):
        if grid is not None and omni.vision is not None:
            for m, f in vision_forward_flops_by_module(omni.vision, grid).items():
                per_module[m] = per_module.get(m, 0.0) + f
    if batch.audio_lengths is not None and omni.audio is not None:
        per_module.update(audio_forward_flops_by_module(omni.audio, batch.audio_lengths))
    return sum(module_passes(m, omni, lora) * f for m, f in per_module.items())
