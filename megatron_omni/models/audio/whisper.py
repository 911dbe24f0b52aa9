"""Whisper-style audio encoder on megatron-core transformer layers.

    mel/fbank [B, n_mels, N]  --conv1 (k3,s1,p1)+GELU--> --conv2 (k3,s2,p1)+GELU--> [B, ceil(N/2), d]
    + positions (sinusoidal, frozen; or learned)
    -> megatron-core TransformerBlock: pre-LayerNorm layers, non-causal self-attention with a
       key-padding mask (AttnMaskType.padding), GELU MLP, final LayerNorm
    -> AudioConnector (stack k frames + 2-layer MLP) -> packed audio tokens.

Variable lengths: clips are padded to a common frame count and described by `lengths`.
Padded input frames and padded conv1 outputs are zeroed (exactly what the convs' own zero
padding gives a clip forwarded alone), padded keys are masked out of attention, so every valid
output equals the clip's own unpadded forward.

Key bias: Whisper's k_proj has no bias while q_proj/v_proj have one.  megatron's fused
linear_qkv has one bias vector laid out per head as [q_h, k_h, v_h]; the k part is set to zero
at construction and a gradient hook zeroes its gradient, so it stays exactly zero under any
optimizer (Adam with a zero gradient makes a zero update; decoupled weight decay keeps 0 at 0).
After an external re-initialisation call `zero_key_bias_()` again.
"""

from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from torch import Tensor, nn

from megatron_omni.models.kernels import megatron_softmax_kernels
from megatron_omni.models.encoder_config import bidirectional_encoder_config
from megatron_omni.config.encoders import AudioConfig, encoder_frame_count
from megatron_omni.models.audio.connector import AudioConnector, ConnectedAudioEncoder, frame_mask
from megatron_omni.models.audio.positions import sinusoids
from megatron_omni.models.audio.sanm import SANMEncoder


def encoder_transformer_config(
    audio: AudioConfig, *, tp: Optional[int] = None, params_dtype: torch.dtype = torch.float32
) -> TransformerConfig:
    """megatron TransformerConfig of the audio encoder.  The encoder is never pipeline-split (it lives
    on the first stage) and runs without sequence parallelism; TP follows the process groups."""
    cuda = torch.cuda.is_available()
    return bidirectional_encoder_config(
        num_layers=audio.num_layers,
        hidden_size=audio.d_model,
        ffn_hidden_size=audio.ffn_hidden_size,
        num_attention_heads=audio.num_attention_heads,
        kv_channels=audio.head_dim,
        layernorm_epsilon=audio.layernorm_epsilon,
        activation_func=F.gelu,  # exact (erf) GELU, as Whisper
        attention_dropout=audio.attention_dropout,
        hidden_dropout=audio.hidden_dropout,
        init_method_std=audio.init_method_std,
        params_dtype=params_dtype,
        tp=tp,
        recompute=audio.recompute,
        masked_softmax_fusion=cuda and megatron_softmax_kernels(),
        # megatron's fused bias-GELU is the tanh approximation: keep the exact GELU.
        bias_activation_fusion=False,
        bias_dropout_fusion=cuda,
        attention_softmax_in_fp32=True,
    )


def encoder_layer_spec(num_layers: int) -> TransformerBlockSubmodules:
    """megatron-core local layers (LayerNorm, bias linears, GELU MLP) with non-causal, key-padded attention."""
    layer = copy.deepcopy(get_gpt_layer_local_spec(normalization="LayerNorm"))
    layer.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.padding}
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=layer.submodules.input_layernorm)


def key_padding_mask(lengths: Tensor, max_len: int, device: torch.device) -> Optional[Tensor]:
    """megatron attention mask [B, 1, S, S] on `device`, True = masked key; None when nothing is padded.
    `lengths` are host lengths: whether any key is padded is decided without a device sync."""
    pad = ~frame_mask(lengths, max_len)  # [B, S]
    if not bool(pad.any()):
        return None
    return pad.to(device, non_blocking=True)[:, None, None, :].expand(-1, 1, max_len, max_len)


class WhisperStyleEncoder(ConnectedAudioEncoder):
    def __init__(self, audio: AudioConfig, config: Optional[TransformerConfig] = None, with_connector: bool = True):
        config = config or encoder_transformer_config(audio)
        super().__init__(config=config)
        self.audio = audio
        d, k = audio.d_model, audio.conv_kernel_size
        self.conv1 = nn.Conv1d(audio.num_mel_bins, d, kernel_size=k, padding=k // 2)
        self.conv2 = nn.Conv1d(d, d, kernel_size=k, stride=audio.conv2_stride, padding=k // 2)
        learned = audio.position_embedding == "learned"
        self.position_embedding = nn.Parameter(
            sinusoids(audio.max_source_positions, d).to(config.params_dtype), requires_grad=learned
        )
        self.decoder = TransformerBlock(config, encoder_layer_spec(audio.num_layers), post_layer_norm=True)
        self.connector = AudioConnector(audio, config, d) if with_connector else None
        self._kbias_masks = []
        for layer in self.decoder.layers:
            bias = layer.self_attention.linear_qkv.bias
            mask = torch.ones_like(bias).view(-1, 3, audio.head_dim)
            mask[:, 1] = 0
            mask = mask.reshape(-1)
            bias.register_hook(lambda g, m=mask: g * m.to(g.device, g.dtype))
            self._kbias_masks.append((bias, mask))
        self.zero_key_bias_()

    @torch.no_grad()
    def zero_key_bias_(self) -> None:
        for bias, mask in self._kbias_masks:
            bias.mul_(mask.to(bias.device, bias.dtype))

    def key_bias_max_abs(self) -> float:
        return max(float(b.detach().view(-1, 3, self.audio.head_dim)[:, 1].abs().max()) for b, _ in self._kbias_masks)

    def encode(self, features: Tensor, lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """features [B, n_mels, N] (clips right-padded to N frames), lengths [B] valid frames (None = all N)
        -> (hidden [B, T, d] after the final LayerNorm, padded rows are junk; enc_lengths [B] on the host)."""
        B, _, N = features.shape
        lengths = self.valid_lengths(features, lengths)  # host
        features = features.to(self.conv1.weight.dtype)  # fp32 fbank into a bf16/fp16 (Float16Module) encoder
        frame_valid = frame_mask(lengths, N).to(features.device, features.dtype, non_blocking=True)
        x = F.gelu(self.conv1(features * frame_valid[:, None, :]))
        x = x * frame_valid[:, None, :]  # conv2 must see zeros past the clip, like its own padding
        x = F.gelu(self.conv2(x))  # [B, d, T]
        T = x.shape[-1]
        enc_lengths = encoder_frame_count(lengths, self.audio)
        x = x.permute(2, 0, 1) + self.position_embedding[:T, None, :].to(x.dtype)  # [T, B, d] megatron layout
        x = self.decoder(hidden_states=x, attention_mask=key_padding_mask(enc_lengths, T, x.device))
        return x.transpose(0, 1), enc_lengths


def build_audio_encoder(audio: AudioConfig, params_dtype: torch.dtype = torch.float32) -> MegatronModule:
    """The configured audio encoder + connector (needs megatron's process groups initialised)."""
    config = encoder_transformer_config(audio, params_dtype=params_dtype)
    if audio.encoder_type == "whisper":
        return WhisperStyleEncoder(audio, config)
    return SANMEncoder(audio, config)
