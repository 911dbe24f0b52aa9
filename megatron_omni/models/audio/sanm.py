"""Paraformer-style SANM audio encoder (the M2-omni paper's choice) with low-frame-rate stacking.

    fbank [B, n_mels, N] --LFR (stack lfr_m frames, hop lfr_n)--> [B, ceil(N/lfr_n), lfr_m*n_mels] --CMVN-->
    * sqrt(d_model) + sinusoidal positions (1-based)
    -> SANM layers: x = x + SelfAttn(LN(x)) + FSMN(V)   (layer 0 maps lfr_m*n_mels -> d, no residual)
                    x = x + FFN_relu(LN(x))
    -> final LayerNorm -> AudioConnector.

LFR: the clip is left-padded with (lfr_m - 1) // 2 copies of its first frame; output frame i stacks
padded frames [i*lfr_n, i*lfr_n + lfr_m), a window running past the clip repeats its last frame.
FSMN memory: a depthwise conv (kernel sanm_kernel_size, no bias, zero padding: left
(k-1)//2 + shift, right the rest) over V, plus V itself, added to the attention output.
Padding: per-clip LFR indices, key-padding mask in attention, V zeroed past the clip before the
FSMN conv and the memory zeroed after it, so valid outputs equal each clip's own forward.

Built from plain torch modules (the encoder is small next to the LLM); it is replicated, not
tensor-split, across TP ranks.  The connector is the shared megatron-parallel `AudioConnector`.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from megatron_omni.config.encoders import AudioConfig, encoder_frame_count
from megatron_omni.models.audio.connector import AudioConnector, ConnectedAudioEncoder, frame_mask
from megatron_omni.models.audio.positions import sinusoids


def lfr_stack(features: Tensor, lengths: Tensor, m: int, n: int) -> Tensor:
    """features [B, C, N] (right-padded), lengths [B] -> [B, T, m*C] stacked frames, T = ceil(N / n); clip i
    has ceil(len_i / n) valid ones (`encoder_frame_count`)."""
    B, C, N = features.shape
    T = -(-N // n)
    j = torch.arange(T, device=features.device)[:, None] * n + torch.arange(m, device=features.device)[None, :]
    src = j[None] - (m - 1) // 2  # [1, T, m] index into the clip
    src = torch.minimum(src.clamp(min=0), (lengths - 1).clamp(min=0)[:, None, None])  # [B, T, m]
    x = features.transpose(1, 2)  # [B, N, C]
    g = torch.gather(x, 1, src.reshape(B, T * m, 1).expand(B, T * m, C))
    return g.reshape(B, T, m * C)


class CMVN(nn.Module):
    """Global mean/variance normalisation of the LFR frames, FunASR's `apply_cmvn`: (x + shift) * scale
    (Paraformer's am.mvn: shift = -mean, scale = 1/std).  Fixed statistics, not trained; identity
    (shift 0, scale 1) unless loaded from a pretrained model (convert/omni_import.py)."""

    def __init__(self, dim: int):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(dim), requires_grad=False)
        self.scale = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x.float() + self.shift) * self.scale

    def _apply(self, fn, recurse=True):
        """Device moves apply, dtype casts do not: the statistics stay fp32 under megatron's
        Float16Module (bf16 would round a shift of -8.3 by up to 0.03, a bias on every frame)."""
        shift, scale = self.shift.data, self.scale.data
        super()._apply(fn, recurse)
        self.shift.data = shift.to(self.shift.device)
        self.scale.data = scale.to(self.scale.device)
        return self


class SANMAttention(nn.Module):
    def __init__(self, in_size: int, d: int, heads: int, kernel: int, shift: int, dropout: float):
        super().__init__()
        self.d, self.h = d, heads
        self.linear_qkv = nn.Linear(in_size, 3 * d)
        self.linear_out = nn.Linear(d, d)
        self.fsmn = nn.Conv1d(d, d, kernel, groups=d, bias=False)
        left = (kernel - 1) // 2 + shift
        self.pad = (left, kernel - 1 - left)
        self.dropout = dropout

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        """x [B, T, in], valid [B, T] bool -> [B, T, d]."""
        B, T, _ = x.shape
        q, k, v = self.linear_qkv(x).split(self.d, dim=-1)
        keep = valid[..., None].to(x.dtype)
        vm = (v * keep).transpose(1, 2)  # [B, d, T]
        memory = (self.fsmn(F.pad(vm, self.pad)) + vm).transpose(1, 2) * keep
        hd = self.d // self.h
        q, k, v = (t.view(B, T, self.h, hd).transpose(1, 2) for t in (q, k, v))
        scores = (q * hd**-0.5) @ k.transpose(-1, -2)  # [B, h, T, T]
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        probs = F.dropout(scores.softmax(-1), self.dropout, self.training)
        ctx = (probs @ v).transpose(1, 2).reshape(B, T, self.d)
        return self.linear_out(ctx) + memory


class SANMLayer(nn.Module):
    def __init__(self, in_size: int, a: AudioConfig):
        super().__init__()
        d = a.d_model
        self.residual = in_size == d
        self.norm1 = nn.LayerNorm(in_size, eps=a.layernorm_epsilon)
        self.self_attn = SANMAttention(in_size, d, a.num_attention_heads, a.sanm_kernel_size, a.sanm_shift,
                                       a.attention_dropout)
        self.norm2 = nn.LayerNorm(d, eps=a.layernorm_epsilon)
        self.ffn = nn.Sequential(nn.Linear(d, a.ffn_hidden_size), nn.ReLU(), nn.Dropout(a.hidden_dropout),
                                 nn.Linear(a.ffn_hidden_size, d))
        self.drop = nn.Dropout(a.hidden_dropout)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        att = self.drop(self.self_attn(self.norm1(x), valid))
        x = x + att if self.residual else att
        return x + self.drop(self.ffn(self.norm2(x)))


class SANMEncoder(ConnectedAudioEncoder):
    def __init__(self, audio: AudioConfig, config: TransformerConfig, with_connector: bool = True):
        super().__init__(config=config)
        if audio.encoder_type != "sanm":
            raise ValueError("SANMEncoder needs encoder_type: sanm")
        self.audio = audio
        in_size = audio.num_mel_bins * audio.lfr_m
        self.layers = nn.ModuleList(
            [SANMLayer(in_size if i == 0 else audio.d_model, audio) for i in range(audio.num_layers)]
        )
        self.final_layernorm = nn.LayerNorm(audio.d_model, eps=audio.layernorm_epsilon)
        self.cmvn = CMVN(in_size)
        self.connector = AudioConnector(audio, config, audio.d_model) if with_connector else None

    def encode(self, features: Tensor, lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """features [B, n_mels, N], lengths [B] -> (hidden [B, T, d] (padded rows junk), enc_lengths [B] on the host)."""
        B, _, N = features.shape
        lengths = self.valid_lengths(features, lengths)  # host
        x = lfr_stack(features, lengths.to(features.device, non_blocking=True), self.audio.lfr_m, self.audio.lfr_n)
        x = self.cmvn(x).to(self.final_layernorm.weight.dtype)  # fp32 CMVN, then the encoder's dtype
        enc_lengths = encoder_frame_count(lengths, self.audio)  # host, = the LFR frames per clip
        T = x.shape[1]
        valid = frame_mask(enc_lengths, T).to(x.device, non_blocking=True)
        x = x * math.sqrt(self.audio.d_model) + sinusoids(T + 1, x.shape[-1])[1:].to(x)
        recompute = self.audio.recompute and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            # Recompute keeps each layer's input only (its softmax probabilities are frames^2 per head).
            x = checkpoint(layer, x, valid, use_reentrant=False) if recompute else layer(x, valid)
        return self.final_layernorm(x), enc_lengths
