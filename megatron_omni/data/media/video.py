"""load_video: probe, sample frames, decode (DALI or PyAV), resize to the NaViT grid, patchify."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from megatron_omni.data import dali
from megatron_omni.data.media.backends import choose_video
from megatron_omni.data.media.errors import MediaError, read_bytes
from megatron_omni.data.media.geometry import plan_video
from megatron_omni.data.media.patches import VisualInput, frames_to_patches
from megatron_omni.data.media.pyav_decode import decode_video_frames, probe_video
from megatron_omni.config.encoders import VisionConfig


def load_video(path: str, *, vision: VisionConfig, max_frames: int, max_tokens: int, sampling: str = "uniform",
               fps: Optional[float] = None, backend: Optional[str] = None) -> VisualInput:
    """Video file -> VisualInput whose whole clip fits in max_tokens merged tokens.

    sampling: "uniform" (min(frames, max_frames) evenly spread) or "fps" (`fps` frames per second of
    video, default geometry.DEFAULT_VIDEO_FPS, capped at max_frames).  See geometry.plan_video.
    Raises MediaError (naming the path) for missing, corrupt, truncated or unsupported files.
    """
    try:
        import av
    except ImportError:
        raise ImportError("video loading needs PyAV (probing, and the CPU decoder for H.264/HEVC/AV1): "
                          "pip install av, or megatron-omni[media]") from None

    data = read_bytes(path)
    try:
        info = probe_video(data)
    except (av.error.FFmpegError, ValueError) as e:
        raise MediaError(path, f"not a readable video ({e})") from None
    plan = plan_video(info.num_frames, info.fps, info.height, info.width, vision=vision, max_frames=max_frames,
                      max_tokens=max_tokens, sampling=sampling, fps=fps)
    size = (plan.height, plan.width)
    name, usable = choose_video(info.codec, backend)
    if not usable:
        raise MediaError(path, f"backend 'dali' ({dali.device()}) cannot decode {info.codec} video")
    if name == "dali":
        try:
            frames = dali.decode_video(data, plan.frame_indices, size)
        except dali.DaliDecodeError as e:
            raise MediaError(path, str(e)) from None
    else:
        try:
            raw = decode_video_frames(data, plan.frame_indices)
        except (av.error.FFmpegError, ValueError) as e:
            raise MediaError(path, f"corrupt or truncated video ({e})") from None
        frames = _resize_frames(raw, size)
    pixel_values, grid_thw = frames_to_patches(frames, vision)
    return VisualInput(pixel_values.cpu(), grid_thw,
                       seconds_per_grid=vision.temporal_patch_size / plan.sampled_fps)


def _resize_frames(frames: np.ndarray, size) -> torch.Tensor:
    """[T, h, w, 3] uint8 -> [T, H, W, 3] uint8, PIL bicubic per frame (the same filter as images)."""
    from PIL import Image

    if frames.shape[1:3] == tuple(size):
        return torch.from_numpy(frames)
    resized = [np.asarray(Image.fromarray(f).resize((size[1], size[0]), resample=Image.Resampling.BICUBIC))
               for f in frames]
    return torch.from_numpy(np.stack(resized))
