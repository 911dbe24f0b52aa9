"""The encoder sections of `omni:` -- `VisionConfig`, `AudioConfig` -- and THE audio-token length rule.

They live in the config package (not beside the encoders) so that the run-config schema, the data
side and the planner read them without importing any model code.  `audio_token_count` is the
single place where the number of audio tokens produced for a clip of N feature frames is computed.
The encoders (`WhisperStyleEncoder`, `SANMEncoder`) and the data side (placeholder `<audio>` span
lengths) both call it; the tests check that it equals the number of tokens the models really emit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Dict, Optional, Union

from megatron_omni.config.typed import ConfigSection

if TYPE_CHECKING:  # the length rule takes python ints or integer tensors; torch is not imported for it
    import torch


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


IntOrTensor = Union[int, "torch.Tensor"]


@dataclass
class AudioConfig(ConfigSection):
    """An audio encoder + connector.  Defaults: a Whisper-large-style encoder on 80-dim fbank."""

    encoder_type: str = "whisper"  # whisper | sanm (Paraformer-style SANM with low-frame-rate stacking)
    num_mel_bins: int = 80  # M2-omni: 80-dim fbank; Whisper-large-v3: 128
    d_model: int = 1280
    num_layers: int = 32
    num_attention_heads: int = 20
    ffn_hidden_size: int = 5120
    # Encoder positions after the conv front-end (Whisper: 1500 = 30 s at 50 Hz); clips longer
    # than the positions table are rejected.  Input frames allowed: 2 * max_source_positions (whisper).
    max_source_positions: int = 1500
    position_embedding: str = "sinusoidal"  # sinusoidal (frozen, Whisper) | learned
    layernorm_epsilon: float = 1e-5
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    init_method_std: float = 0.02
    # Whisper conv front-end: conv1 (k3, s1, p1) + GELU, conv2 (k3, s2, p1) + GELU.
    conv_kernel_size: int = 3
    conv2_stride: int = 2
    # Connector: stack `downsample_factor` adjacent encoder frames (the tail is zero-padded up to
    # a full group), then Linear(k*d_model -> connector_hidden_size) + GELU + Linear(-> out_hidden_size).
    downsample_factor: int = 4
    connector_hidden_size: Optional[int] = None  # None = out_hidden_size
    out_hidden_size: int = 4096  # the LLM width
    # SANM only: low frame rate (stack lfr_m frames, hop lfr_n) and the FSMN memory kernel.
    lfr_m: int = 7
    lfr_n: int = 6
    sanm_kernel_size: int = 11
    sanm_shift: int = 0  # left shift of the FSMN window (0 = centred)
    # Recompute every encoder layer in the backward (megatron full recompute for Whisper-style,
    # torch.utils.checkpoint per SAN-M layer): more encoder compute, far fewer stored activations.
    recompute: bool = False

    def __post_init__(self):
        if self.encoder_type not in ("whisper", "sanm"):
            raise ValueError(f"encoder_type must be whisper or sanm, got {self.encoder_type!r}")
        if self.position_embedding not in ("sinusoidal", "learned"):
            raise ValueError(f"position_embedding must be sinusoidal or learned, got {self.position_embedding!r}")
        if self.d_model % self.num_attention_heads:
            raise ValueError("d_model must be divisible by num_attention_heads")
        if self.downsample_factor < 1:
            raise ValueError("downsample_factor must be >= 1")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_attention_heads

    @property
    def max_input_frames(self) -> int:
        """Longest clip (feature frames) the positions table covers."""
        if self.encoder_type == "whisper":
            return self.max_source_positions * self.conv2_stride
        return self.max_source_positions * self.lfr_n


def _ceil_div(a: IntOrTensor, b: int) -> IntOrTensor:
    return -((-a) // b)  # exact for python ints and integer tensors (floor division)


def encoder_frame_count(num_feature_frames: IntOrTensor, config: AudioConfig) -> IntOrTensor:
    """Encoder output frames (before the connector) for a clip of `num_feature_frames` frames.

    whisper: conv1 (k3, s1, p1) keeps N; conv2 (k3, s2, p1) gives floor((N + 2 - 3) / 2) + 1
             = ceil(N / 2)  (general stride s: floor((N - 1) / s) + 1 = ceil(N / s)).
    sanm:    low frame rate, hop lfr_n with the last window padded by repeating the last frame:
             ceil(N / lfr_n).
    """
    n = num_feature_frames
    if config.encoder_type == "whisper":
        return _ceil_div(n, config.conv2_stride)
    return _ceil_div(n, config.lfr_n)


def audio_token_count(num_feature_frames: IntOrTensor, config: AudioConfig) -> IntOrTensor:
    """THE number of audio tokens (LLM positions) for a clip of `num_feature_frames` fbank/mel frames.

    tokens = ceil(encoder_frame_count(N) / downsample_factor): the connector stacks k adjacent
    encoder frames and zero-pads the last, partial group, so every encoder frame is kept and a
    non-empty clip always yields >= 1 token.  With Whisper (stride 2) that is ceil(ceil(N/2)/k)
    = ceil(N / (2k)).  Accepts an int or an integer tensor (element-wise); 0 frames -> 0 tokens.
    """
    return _ceil_div(encoder_frame_count(num_feature_frames, config), config.downsample_factor)
