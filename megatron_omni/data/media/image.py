"""load_image: decode, aspect-preserving resize to the NaViT grid, patchify."""

from __future__ import annotations

import io
from typing import Optional, Tuple

import torch

from megatron_omni.data import dali
from megatron_omni.data.media.backends import choose_image
from megatron_omni.data.media.errors import MediaError, read_bytes
from megatron_omni.data.media.geometry import image_grid
from megatron_omni.data.media.patches import VisualInput, frames_to_patches
from megatron_omni.config.encoders import VisionConfig

# EXIF orientations that rotate by 90 degrees (decoders apply them, so the stored W and H swap).
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def load_image(path: str, *, vision: VisionConfig, max_tokens: int, min_tokens: int = 4,
               backend: Optional[str] = None) -> VisualInput:
    """Image file -> VisualInput with (H/28)*(W/28) <= max_tokens merged tokens.

    The image is repeated to temporal_patch_size frames (Qwen2-VL), so grid_thw = (1, H/14, W/14).
    Raises MediaError (naming the path) for missing, corrupt, truncated or unsupported files.
    """
    data = read_bytes(path)
    height, width, fmt = _header(data, path)
    size = image_grid(height, width, vision=vision, max_tokens=max_tokens, min_tokens=min_tokens)
    name, usable = choose_image(fmt, backend)
    if not usable:
        raise MediaError(path, f"backend 'dali' cannot decode {fmt} images")
    if name == "dali":
        try:
            frame = dali.decode_image(data, size)
        except dali.DaliDecodeError as e:
            raise MediaError(path, str(e)) from None
    else:
        frame = _decode_pil(data, size, path)
    frames = frame.unsqueeze(0).expand(vision.temporal_patch_size, -1, -1, -1)
    pixel_values, grid_thw = frames_to_patches(frames, vision)
    return VisualInput(pixel_values.cpu(), grid_thw, seconds_per_grid=0.0)


def _header(data: bytes, path) -> Tuple[int, int, str]:
    """(height, width) as displayed and PIL's format name, read from the header only."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            fmt = image.format or "unknown"
            orientation = image.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise MediaError(path, f"not a readable image ({e})") from None
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return height, width, fmt


def _decode_pil(data: bytes, size: Tuple[int, int], path) -> torch.Tensor:
    import numpy as np
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            # PIL's bicubic is what transformers' Qwen2-VL image processor resizes with.
            image = image.resize((size[1], size[0]), resample=Image.Resampling.BICUBIC)
            return torch.from_numpy(np.asarray(image).copy())
    except (OSError, SyntaxError, ValueError) as e:
        raise MediaError(path, f"corrupt or truncated image ({e})") from None
