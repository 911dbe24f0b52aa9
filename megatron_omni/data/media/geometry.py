"""Pure resize / frame-sampling arithmetic for the NaViT input grid (no decoding here).

Token accounting (paper Table 2 "max image tokens" 320 / 1280 / 2560): a budget counts *LLM tokens*
after the vision connector's 2x2 merge, i.e. one token per (patch * merge)^2 = 28 x 28 pixel cell per
temporal group of `temporal_patch_size` frames.  A video's budget is for the whole clip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

from megatron_omni.config.encoders import VisionConfig

# Qwen2-VL samples videos at 2 frames/s by default (qwen_vl_utils FPS = 2.0); used when sampling="fps"
# is asked for without an explicit rate.
DEFAULT_VIDEO_FPS = 2.0
# Fewest LLM tokens one temporal group of a video frame may get: a 56x56 frame.  With less than this per
# group, fewer frames are sampled rather than shrinking frames to nothing.
MIN_TOKENS_PER_FRAME_GROUP = 4


def cell_size(vision: VisionConfig) -> int:
    """Pixels per side of one merged LLM token: patch_size * spatial_merge_size (28 for Qwen2-VL)."""
    return vision.patch_size * vision.spatial_merge_size


def image_grid(height: int, width: int, *, vision: VisionConfig, max_tokens: int, min_tokens: int = 4
               ) -> Tuple[int, int]:
    """Resized (H, W) in pixels: multiples of patch*merge, (H/c)*(W/c) <= max_tokens, aspect kept.

    Qwen2-VL `smart_resize` semantics with max_pixels = max_tokens * c^2 and min_pixels = min_tokens * c^2
    (c = patch * merge): round each side to the nearest multiple of c; if that exceeds the budget, scale
    both sides down by sqrt(area / max_pixels) and floor; if it is below min_pixels, scale up and ceil.
    Unlike smart_resize, extreme aspect ratios are not rejected: a side never drops below one cell, and
    the longer side is then cut so the token bound always holds (max_tokens wins over min_tokens).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image_grid: image size must be positive, got {height}x{width}")
    if max_tokens < 1 or min_tokens < 0:
        raise ValueError(f"image_grid: need max_tokens >= 1 and min_tokens >= 0, got {max_tokens}, {min_tokens}")
    c = cell_size(vision)
    max_pixels, min_pixels = max_tokens * c * c, min(min_tokens, max_tokens) * c * c
    h_bar = max(c, round(height / c) * c)
    w_bar = max(c, round(width / c) * c)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(c, math.floor(height / beta / c) * c)
        w_bar = max(c, math.floor(width / beta / c) * c)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / c) * c
        w_bar = math.ceil(width * beta / c) * c
    # Clamping a side up to one cell (or the ceil above) can overshoot the budget: cut the longer side.
    if (h_bar // c) * (w_bar // c) > max_tokens:
        if h_bar >= w_bar:
            h_bar = max(1, max_tokens // (w_bar // c)) * c
        else:
            w_bar = max(1, max_tokens // (h_bar // c)) * c
    return h_bar, w_bar


@dataclass(frozen=True)
class VideoPlan:
    """Which frames to decode and the size to resize them to."""

    frame_indices: List[int]  # length = multiple of temporal_patch_size; the last index repeats as padding
    height: int
    width: int
    sampled_fps: float  # distinct sampled frames per second of video

    @property
    def num_frames(self) -> int:
        return len(self.frame_indices)


def plan_video(total_frames: int, native_fps: float, height: int, width: int, *, vision: VisionConfig,
               max_frames: int, max_tokens: int, sampling: str = "uniform", fps: float | None = None
               ) -> VideoPlan:
    """Frames to sample from a clip of `total_frames` at `native_fps`, and their resized size.

    uniform: min(total, max_frames) frames spread evenly over the whole clip.
    fps:     round(duration * fps) frames (at least 1), capped the same way, spread evenly.
    Frame counts are then padded up to a multiple of temporal_patch_size by repeating the last frame
    (max_frames is first floored to such a multiple).  The clip's token budget is split evenly over the
    temporal groups; if a group would get fewer than MIN_TOKENS_PER_FRAME_GROUP tokens, fewer frames
    are sampled instead.
    """
    tps = vision.temporal_patch_size
    if total_frames < 1:
        raise ValueError("plan_video: the clip has no frames")
    if max_frames < tps:
        raise ValueError(f"plan_video: max_frames={max_frames} is below temporal_patch_size={tps}")
    if max_tokens < MIN_TOKENS_PER_FRAME_GROUP:
        raise ValueError(f"plan_video: max_tokens={max_tokens} is below {MIN_TOKENS_PER_FRAME_GROUP}")
    if native_fps <= 0:
        raise ValueError(f"plan_video: native fps must be positive, got {native_fps}")
    cap = min(total_frames, max_frames // tps * tps)
    if sampling == "uniform":
        count = cap
    elif sampling == "fps":
        rate = DEFAULT_VIDEO_FPS if fps is None else fps
        if rate <= 0:
            raise ValueError(f"plan_video: sampling fps must be positive, got {rate}")
        count = min(cap, max(1, round(total_frames / native_fps * rate)))
    else:
        raise ValueError(f"plan_video: sampling must be 'uniform' or 'fps', got {sampling!r}")
    count = min(count, max_tokens // MIN_TOKENS_PER_FRAME_GROUP * tps)
    indices = np.linspace(0, total_frames - 1, count).round().astype(np.int64).tolist()
    indices += [indices[-1]] * (-count % tps)
    groups = len(indices) // tps
    h, w = image_grid(height, width, vision=vision, max_tokens=max_tokens // groups,
                      min_tokens=MIN_TOKENS_PER_FRAME_GROUP)
    return VideoPlan(indices, h, w, sampled_fps=count * native_fps / total_frames)
