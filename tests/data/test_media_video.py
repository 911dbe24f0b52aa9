"""Video: frame-sampling counts, the clip token budget, DALI (VP9) vs PyAV (H.264) frames, and
pixel_values vs transformers' Qwen2-VL video processor."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from megatron_omni.data.media import CLIP_STD, frames_to_patches, load_video, plan_video, synth
from megatron_omni.data.media.geometry import MIN_TOKENS_PER_FRAME_GROUP
from megatron_omni.config.encoders import VisionConfig

VISION = VisionConfig()
TPS = VISION.temporal_patch_size
LEVEL = 1.0 / 255.0 / min(CLIP_STD)  # one 8-bit level in normalised pixel units


@pytest.mark.parametrize("sampling", ["uniform", "fps"])
def test_frame_sampling_counts(sampling):
    grid = itertools.product([1, 2, 5, 30, 301], [8.0, 25.0, 29.97], [2, 8, 16, 17], [0.5, 2.0, 100.0], [16, 2560])
    for total, native_fps, max_frames, fps, max_tokens in grid:
        plan = plan_video(total, native_fps, 360, 640, vision=VISION, max_frames=max_frames, max_tokens=max_tokens,
                          sampling=sampling, fps=fps)
        idx = plan.frame_indices
        assert len(idx) % TPS == 0 and 0 < len(idx) <= max_frames
        assert idx == sorted(idx) and 0 <= idx[0] and idx[-1] < total
        distinct = len(set(idx))
        cap = min(total, max_frames // TPS * TPS, max_tokens // MIN_TOKENS_PER_FRAME_GROUP * TPS)
        if sampling == "uniform":
            expected = cap
        else:
            expected = min(cap, max(1, round(total / native_fps * fps)))
        assert distinct == expected, (total, native_fps, max_frames, fps, idx)
        assert len(idx) - distinct < TPS  # padding repeats the last frame only to fill a temporal group
        if distinct > 1:
            assert idx[0] == 0 and idx[-1] == total - 1  # spread over the whole clip
        groups = len(idx) // TPS
        tokens = groups * (plan.height // 28) * (plan.width // 28)
        assert tokens <= max_tokens
        assert plan.sampled_fps == pytest.approx(distinct * native_fps / total)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """The same 30-frame, 10 fps, 112x168 synthetic clip as VP9/WebM and H.264/MP4."""
    root = tmp_path_factory.mktemp("video")
    frames = synth.smooth_clip(30, 112, 168)
    paths = {"vp9": root / "clip.webm", "h264": root / "clip.mp4"}
    for codec, path in paths.items():
        synth.write_video(path, frames, fps=10.0, codec=codec)
    return frames, paths


def test_fps_and_uniform_sampling_on_a_file(clips):
    _, paths = clips
    # 3 s clip: 2 fps -> 6 frames -> 3 temporal groups, one every second
    out = load_video(str(paths["vp9"]), vision=VISION, max_frames=32, max_tokens=2560, sampling="fps", fps=2.0)
    assert out.grid_thw[0, 0].item() == 3
    assert out.seconds_per_grid == pytest.approx(1.0)
    # uniform, capped at 8 frames -> 4 groups of 2 frames over 3 s
    out = load_video(str(paths["vp9"]), vision=VISION, max_frames=9, max_tokens=2560)
    assert out.grid_thw[0, 0].item() == 4
    assert out.seconds_per_grid == pytest.approx(TPS / (8 / 3.0))
    # the clip's budget is shared by all groups: 40 tokens over 4 groups -> <= 10 each
    out = load_video(str(paths["vp9"]), vision=VISION, max_frames=8, max_tokens=40)
    t, h, w = out.grid_thw[0].tolist()
    assert t * (h // 2) * (w // 2) <= 40
    assert out.pixel_values.shape == (t * h * w, VISION.patch_dim)


def _reference_patches(frames: np.ndarray, indices, size) -> torch.Tensor:
    from PIL import Image

    resized = np.stack([np.asarray(Image.fromarray(frames[i]).resize((size[1], size[0]), Image.Resampling.BICUBIC))
                        for i in indices])
    return frames_to_patches(torch.from_numpy(resized), VISION)[0]


def test_dali_vp9_and_pyav_h264_give_the_same_frames(clips):
    pytest.importorskip("nvidia.dali")
    frames, paths = clips
    kwargs = dict(vision=VISION, max_frames=8, max_tokens=640)
    vp9 = load_video(str(paths["vp9"]), backend="dali", **kwargs)
    h264 = load_video(str(paths["h264"]), backend="pyav", **kwargs)
    vp9_pyav = load_video(str(paths["vp9"]), backend="pyav", **kwargs)
    assert vp9.grid_thw.tolist() == h264.grid_thw.tolist() == vp9_pyav.grid_thw.tolist()
    t, h, w = vp9.grid_thw[0].tolist()
    plan = plan_video(30, 10.0, 112, 168, **kwargs)
    source = _reference_patches(frames, plan.frame_indices, (plan.height, plan.width))
    for name, out in [("dali vp9", vp9), ("pyav h264", h264), ("pyav vp9", vp9_pyav)]:
        err = (out.pixel_values - source).abs().mean() / LEVEL
        assert err < 4.0, f"{name}: mean error {err:.2f} levels vs the source frames"
    between = (vp9.pixel_values - h264.pixel_values).abs().mean() / LEVEL
    assert between < 4.0, between
    # Frame order: each decoded temporal group is closest to its own source group.
    rows = h * w
    for g in range(t):
        dist = [(vp9.pixel_values[g * rows:(g + 1) * rows] - source[k * rows:(k + 1) * rows]).abs().mean()
                for k in range(t)]
        assert int(np.argmin(dist)) == g


def test_video_pixel_values_equal_hf_video_processor(clips):
    """Decoded + resized frames, laid out by transformers' Qwen2-VL video processor (no resize there)."""
    from transformers import Qwen2VLVideoProcessor

    frames, paths = clips
    out = load_video(str(paths["h264"]), vision=VISION, max_frames=4, max_tokens=640, backend="pyav")
    t, h, w = out.grid_thw[0].tolist()
    # Recover the uint8 frames exactly from our own output, then let transformers lay them out.
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])
    std = torch.tensor(CLIP_STD)
    x = out.pixel_values.reshape(t, h // 2, w // 2, 2, 2, 3, TPS, 14, 14).permute(0, 6, 1, 3, 7, 2, 4, 8, 5)
    x = x.reshape(t * TPS, h * 14, w * 14, 3)
    uint8 = ((x * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    ref = Qwen2VLVideoProcessor(do_resize=False, do_sample_frames=False)(videos=[uint8], return_tensors="pt")
    assert ref["video_grid_thw"].tolist() == out.grid_thw.tolist()
    torch.testing.assert_close(out.pixel_values, ref["pixel_values_videos"].float(), atol=1e-5, rtol=1e-5)
