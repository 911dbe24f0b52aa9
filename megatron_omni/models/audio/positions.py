"""The frozen sinusoidal position table of Whisper, shared by the Whisper-style and SAN-M encoders."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """Whisper's sinusoidal table [length, channels]: [sin(t * w_i) | cos(t * w_i)],
    w_i = max_timescale ** (-i / (channels/2 - 1))."""
    half = channels // 2
    inv = torch.exp(-math.log(max_timescale) / (half - 1) * torch.arange(half, dtype=torch.float64))
    t = torch.arange(length, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cat([t.sin(), t.cos()], dim=1).float()
