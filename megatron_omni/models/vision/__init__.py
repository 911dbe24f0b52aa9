"""NaViT-style vision encoder (Qwen2-VL vision-tower architecture) on megatron-core."""

from megatron_omni.config.encoders import VisionConfig
from megatron_omni.models.vision.encoder import (
    NaViTEncoder,
    block_diagonal_mask,
    merged_token_counts,
    vision_cu_seqlens,
    vision_layer_spec,
    vision_position_ids,
    vision_rotary_freqs,
    vision_transformer_config,
)
from megatron_omni.models.vision.hf_weights import hf_to_megatron, load_hf_state_dict, megatron_to_hf

__all__ = [
    "VisionConfig",
    "NaViTEncoder",
    "block_diagonal_mask",
    "merged_token_counts",
    "vision_cu_seqlens",
    "vision_layer_spec",
    "vision_position_ids",
    "vision_rotary_freqs",
    "vision_transformer_config",
    "hf_to_megatron",
    "megatron_to_hf",
    "load_hf_state_dict",
]
