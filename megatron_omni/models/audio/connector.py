"""Audio connector: stack k adjacent encoder frames, then a 2-layer GELU MLP to the LLM width.

Tensor parallel: fc1 is column-parallel, fc2 row-parallel (input already split), so the output
is the full `out_hidden_size` on every TP rank.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import init_method_normal
from torch import Tensor

from megatron_omni.config.encoders import AudioConfig, _ceil_div


class AudioConnector(MegatronModule):
    def __init__(self, audio: AudioConfig, config: TransformerConfig, in_size: int):
        super().__init__(config=config)
        self.k = audio.downsample_factor
        hidden = audio.connector_hidden_size or audio.out_hidden_size
        init = init_method_normal(audio.init_method_std)
        self.linear_fc1 = tensor_parallel.ColumnParallelLinear(
            in_size * self.k, hidden, config=config, init_method=init, bias=True, gather_output=False,
            skip_bias_add=False,
        )
        self.linear_fc2 = tensor_parallel.RowParallelLinear(
            hidden, audio.out_hidden_size, config=config, init_method=init, bias=True, input_is_parallel=True,
            skip_bias_add=False,
        )

    def forward(self, hidden: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        """hidden [B, T, d] (padded encoder frames), lengths [B] valid frames on the host ->
        (tokens [sum_i ceil(len_i / k), out_hidden_size] packed clip by clip, token_lengths [B], host)."""
        B, T, d = hidden.shape
        valid = frame_mask(lengths, T).to(hidden.device, non_blocking=True)
        hidden = hidden * valid[..., None].to(hidden.dtype)  # the partial last group is zero-padded
        pad = (-T) % self.k
        if pad:
            hidden = F.pad(hidden, (0, 0, 0, pad))
        groups = hidden.reshape(B, (T + pad) // self.k, self.k * d)
        token_lengths = _ceil_div(lengths, self.k)
        x = valid_rows(groups, token_lengths)  # [N, k*d], clip-major
        x, _ = self.linear_fc1(x)
        x = F.gelu(x)
        x, _ = self.linear_fc2(x)
        return x, token_lengths


def frame_mask(lengths: Tensor, max_len: int) -> Tensor:
    """[B, max_len] bool, True at the valid frames of each clip; built where `lengths` lives."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def valid_rows(x: Tensor, lengths: Tensor) -> Tensor:
    """The first lengths[b] rows of each x[b] ([B, T, ...]), packed clip by clip -> [sum(lengths), ...].
    The gather index is built from the host `lengths`: a boolean mask on the device would make the
    output size data-dependent, a device sync per audio microbatch."""
    B, T = x.shape[:2]
    index = frame_mask(lengths, T).flatten().nonzero().squeeze(1)  # host op on host lengths
    return x.reshape(B * T, *x.shape[2:]).index_select(0, index.to(x.device, non_blocking=True))


class ConnectedAudioEncoder(MegatronModule):
    """Base of the audio encoders: each defines `encode(features, lengths) -> (hidden [B, T, d],
    encoder lengths [B])` and a `connector` (or None); forward adds the connector, valid tokens only."""

    connector: Optional[AudioConnector]
    audio: AudioConfig

    def valid_lengths(self, features: Tensor, lengths: Optional[Tensor]) -> Tensor:
        """Valid frames per clip, [B] long on the HOST (None = every frame of `features` [B, n_mels, N]),
        bounded.  The encoders plan their shapes and masks from host lengths: training keeps the media
        metadata on the host, so nothing here waits for the device (given device lengths, e.g. from the
        HF processor, are read once)."""
        B, _, N = features.shape
        lengths = torch.full((B,), N, dtype=torch.long) if lengths is None else lengths.long().cpu()
        longest = int(lengths.max())
        if longest > self.audio.max_input_frames:
            raise ValueError(f"clip of {longest} frames exceeds max_input_frames={self.audio.max_input_frames}")
        return lengths

    def forward(self, features: Tensor, lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """-> (audio tokens [sum_i audio_token_count(len_i), out_hidden_size] packed clip by clip,
        token_lengths [B] on the host)."""
        hidden, enc_lengths = self.encode(features, lengths)
        if self.connector is None:
            return valid_rows(hidden, enc_lengths), enc_lengths
        return self.connector(hidden, enc_lengths)
