"""Configuration of the NaViT-style vision encoder (Qwen2-VL vision-tower architecture)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

from megatron_omni.models.config_section import ConfigSection




@dataclass
class VisionConfig(ConfigSection):
    """ViT for native-resolution images / videos + 2x2 merge connector.

    Defaults are the ~600M "ViT-600M" class used by M2-omni (= Qwen2-VL's vision tower:
    depth 32, width 1280, 16 heads, MLP 5120).  HF `Qwen2VLVisionConfig` names in comments.
    """

    depth: int = 32  # depth
    hidden_size: int = 1280  # embed_dim (the ViT width)
    num_attention_heads: int = 16  # num_heads
    ffn_hidden_size: int = 5120  # embed_dim * mlp_ratio
    patch_size: int = 14
    temporal_patch_size: int = 2
    in_channels: int = 3
    spatial_merge_size: int = 2
    out_hidden_size: int = 4096  # hidden_size in HF: the LLM width the connector projects to
    norm_epsilon: float = 1e-6  # LayerNorm eps of the blocks and of the merger's LayerNorm
    activation: str = "quick_gelu"  # hidden_act (ViT MLP); the merger always uses exact GELU
    rotary_base: float = 10000.0  # rope_theta of the 2D (h, w) rotary
    init_method_std: float = 0.02  # initializer_range
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    # auto = Transformer Engine layers + THD packed attention when usable, else local layers +
    # block-diagonal mask; "local" forces the latter.
    transformer_impl: str = "auto"
    # Recompute every ViT block in the backward (megatron full recompute, one block per
    # checkpoint): one more encoder forward for a small fraction of its activation memory.
    recompute: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("vision hidden_size must be divisible by num_attention_heads")
        if self.head_dim % 4:
            raise ValueError("vision head_dim must be divisible by 4 (h and w rotary halves)")
        if self.activation not in ("quick_gelu", "gelu"):
            raise ValueError(f"unsupported vision activation {self.activation!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_dim(self) -> int:
        """Width of one flattened input patch row: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_width(self) -> int:
        return self.hidden_size * self.spatial_merge_size ** 2

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def num_parameters(self, out_hidden_size: Optional[int] = None) -> int:
        """Closed-form parameter count (patch embed + blocks + merger), TP-independent."""
        d, f, m = self.hidden_size, self.ffn_hidden_size, self.merge_width
        out = out_hidden_size or self.out_hidden_size
        per_layer = (
            2 * 2 * d  # two LayerNorms (weight + bias)
            + d * 3 * d + 3 * d  # qkv
            + d * d + d  # proj
            + d * f + f + f * d + d  # fc1, fc2
        )
        merger = 2 * d + m * m + m + m * out + out
        return self.patch_dim * d + self.depth * per_layer + merger
