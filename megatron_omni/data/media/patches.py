"""uint8 frames -> normalized, flattened NaViT patches in the Qwen2-VL layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_omni.config.encoders import VisionConfig

# OpenAI CLIP pixel statistics (Qwen2-VL's image processor uses them: OPENAI_CLIP_MEAN / _STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisualInput:
    pixel_values: Tensor  # [N, C*T*P*P] float32, Qwen2-VL patch layout, CLIP-normalized
    grid_thw: Tensor  # [1, 3] int64 (t, h, w) in patches
    seconds_per_grid: float  # video: temporal_patch_size / sampled fps; image: 0.0


def frames_to_patches(frames: Tensor, vision: VisionConfig) -> tuple[Tensor, Tensor]:
    """[T, H, W, C] uint8 (T a multiple of temporal_patch_size) -> (pixel_values, grid_thw).

    Rows are patches in the order the vision tower's 2x2 merger expects: for each temporal group, the
    merge windows in raster order, and inside a window its m x m patches in raster order.  A row is
    (C, T, P, P) flattened.  H and W must be multiples of patch_size * spatial_merge_size.
    """
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != vision.in_channels:
        raise ValueError(f"frames must be uint8 [T, H, W, {vision.in_channels}], got {frames.dtype} "
                         f"{tuple(frames.shape)}")
    t, h, w, c = frames.shape
    p, m, tps = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    if t % tps or h % (p * m) or w % (p * m):
        raise ValueError(f"frames {t}x{h}x{w} must be multiples of ({tps}, {p * m}, {p * m})")
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=frames.device)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=frames.device)
    x = (frames.float() / 255.0 - mean) / std  # [T, H, W, C]
    gt, gh, gw = t // tps, h // p, w // p
    x = x.reshape(gt, tps, gh // m, m, p, gw // m, m, p, c)
    # -> (gt, gh/m, gw/m, m_h, m_w, C, tps, p_h, p_w)
    x = x.permute(0, 2, 5, 3, 6, 8, 1, 4, 7)
    pixel_values = x.reshape(gt * gh * gw, c * tps * p * p).contiguous()
    grid_thw = torch.tensor([[gt, gh, gw]], dtype=torch.int64)
    return pixel_values, grid_thw
