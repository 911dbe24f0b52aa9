"""Images: NaViT grid arithmetic vs transformers' smart_resize, and pixel_values vs transformers'
Qwen2-VL image processor (patch layout, CLIP normalisation, bicubic resize)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_omni.data.media import CLIP_MEAN, CLIP_STD, frames_to_patches, image_grid, load_image, synth
from megatron_omni.config.encoders import VisionConfig

qwen2_vl = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl")

VISION = VisionConfig()
CELL = 28  # patch 14 x merge 2
BUDGETS = (4, 16, 64, 320, 1280, 2560)  # small ones + paper Table 2 max image tokens


def _shapes(n: int, seed: int, low: int, high: int):
    rng = np.random.default_rng(seed)
    return [(int(h), int(w)) for h, w in rng.integers(low, high, size=(n, 2))]


def test_image_grid_equals_smart_resize():
    """Where smart_resize's result fits (no side clamped), image_grid is smart_resize with
    max_pixels = max_tokens * 28^2, min_pixels = min_tokens * 28^2."""
    checked = 0
    for h, w in _shapes(400, seed=0, low=28, high=3000):
        if max(h, w) / min(h, w) > 50:
            continue
        for max_tokens in BUDGETS:
            ref = qwen2_vl.smart_resize(h, w, factor=CELL, min_pixels=4 * CELL * CELL,
                                        max_pixels=max_tokens * CELL * CELL)
            if (ref[0] // CELL) * (ref[1] // CELL) > max_tokens:
                continue  # smart_resize itself overshoots (min_pixels > max_pixels); covered below
            assert image_grid(h, w, vision=VISION, max_tokens=max_tokens) == tuple(ref), (h, w, max_tokens)
            checked += 1
    assert checked > 1500


@pytest.mark.parametrize("max_tokens", BUDGETS)
def test_image_grid_bound_and_aspect(max_tokens):
    shapes = _shapes(300, seed=max_tokens, low=1, high=5000) + [(1, 5000), (5000, 3), (27, 27), (10, 10000)]
    for h, w in shapes:
        H, W = image_grid(h, w, vision=VISION, max_tokens=max_tokens)
        assert H % CELL == 0 and W % CELL == 0 and H >= CELL and W >= CELL
        tokens = (H // CELL) * (W // CELL)
        assert tokens <= max_tokens, (h, w, H, W)
        if max(h, w) / min(h, w) <= 20 and min(H, W) >= 4 * CELL:
            # each side is within one cell of the exactly scaled side: aspect error <= ~2 cells
            err = abs(math.log(H / W) - math.log(h / w))
            assert err <= math.log1p(CELL / min(H, W)) * 2 + 1e-9, (h, w, H, W)
    # Upscaling small images reaches min_tokens.
    assert image_grid(20, 20, vision=VISION, max_tokens=320, min_tokens=4) == (56, 56)


def test_frames_to_patches_equals_hf_layout():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(56, 84, 3), dtype=np.uint8)
    ref = qwen2_vl.Qwen2VLImageProcessor(do_resize=False)(images=[image], return_tensors="pt")
    frames = torch.from_numpy(image)[None].expand(2, -1, -1, -1)
    pixel_values, grid_thw = frames_to_patches(frames, VISION)
    assert grid_thw.tolist() == ref["image_grid_thw"].tolist() == [[1, 4, 6]]
    torch.testing.assert_close(pixel_values, ref["pixel_values"].float(), atol=1e-5, rtol=1e-5)
    assert tuple(qwen2_vl.Qwen2VLImageProcessor().image_mean) == CLIP_MEAN
    assert tuple(qwen2_vl.Qwen2VLImageProcessor().image_std) == CLIP_STD


@pytest.fixture(scope="module")
def png_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "pattern.png"
    rgb = synth.smooth_rgb(150, 230)
    rgb[::7, ::5] = 255  # some high-frequency content so resizing filters matter
    synth.write_image(path, rgb)
    return path


@pytest.mark.parametrize("max_tokens", [12, 40])
def test_pil_backend_equals_hf_processor_end_to_end(png_path, max_tokens):
    """Decode + smart-resize (PIL bicubic) + normalise + patchify == transformers' PIL image processor."""
    from PIL import Image

    from transformers import Qwen2VLImageProcessorPil

    ours = load_image(str(png_path), vision=VISION, max_tokens=max_tokens, backend="pil")
    ref = Qwen2VLImageProcessorPil(min_pixels=4 * CELL * CELL, max_pixels=max_tokens * CELL * CELL)(
        images=[Image.open(png_path).convert("RGB")], return_tensors="pt")
    assert ours.grid_thw.tolist() == ref["image_grid_thw"].tolist()
    assert ours.seconds_per_grid == 0.0
    torch.testing.assert_close(ours.pixel_values, ref["pixel_values"].float(), atol=1e-5, rtol=1e-5)


def test_dali_backend_close_to_pil(png_path):
    """DALI's cubic antialiased resize differs from PIL's bicubic only by rounding-level noise."""
    pytest.importorskip("nvidia.dali")
    dali = load_image(str(png_path), vision=VISION, max_tokens=40, backend="dali")
    pil = load_image(str(png_path), vision=VISION, max_tokens=40, backend="pil")
    assert dali.grid_thw.tolist() == pil.grid_thw.tolist()
    level = 1.0 / 255.0 / min(CLIP_STD)  # one 8-bit level in normalised units
    diff = (dali.pixel_values - pil.pixel_values).abs()
    assert diff.mean() < 1.5 * level, diff.mean() / level
    assert diff.max() < 24 * level, diff.max() / level


def test_jpeg_and_exif_orientation(tmp_path):
    from PIL import Image

    rgb = synth.smooth_rgb(60, 200)  # wide
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display: the image is tall
    Image.fromarray(rgb).save(path, format="JPEG", quality=95, exif=exif)
    for backend in ("pil", "dali"):
        if backend == "dali":
            pytest.importorskip("nvidia.dali")
        out = load_image(str(path), vision=VISION, max_tokens=64, backend=backend)
        t, gh, gw = out.grid_thw[0].tolist()
        assert t == 1 and gh > gw, (backend, gh, gw)
        assert out.pixel_values.shape == (gh * gw, VISION.patch_dim)
