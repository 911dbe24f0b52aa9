"""Group `dali` (nvidia-dali only; skipped with the reason without it): DALI's decoders on the GPU
(`MEGATRON_OMNI_DALI_DEVICE` unset = gpu with CUDA) vs the CPU decoders the loader falls back to
(PIL for images, PyAV for video and audio), on synthetic media written here (data/media/synth.py):

* images: PNG (lossless: equal up to rounding) and JPEG (decoder differences), sizes a multiple of
  28 so neither path resizes; mean |d| of the CLIP-normalised patches <= 0.02, max <= 0.3.
* video (needs PyAV to write the clips): VP9 WebM and H.264 MP4, same frames sampled; mean |d| <= 0.05,
  max <= 0.6 (a few 8-bit levels).
* audio (needs PyAV, the loader's audio path imports it): a WAV chirp, waveform max |d| <= 1e-4.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Dict, Optional

from megatron_omni.gpu_check.context import CheckContext, config_path
from megatron_omni.gpu_check.result import CheckResult, judged, skipped

CHECKS = ("dali_gpu_vs_cpu_decode",)
BUDGET_S = {"quick": 40, "full": 60}
IMAGE_TOL_MEAN, IMAGE_TOL_MAX, AUDIO_TOL = 0.02, 0.3, 1e-4
# two video decoders of one stream differ by a few 8-bit levels (0.05 ~ 3 levels after CLIP normalisation)
VIDEO_TOL_MEAN, VIDEO_TOL_MAX = 0.05, 0.6


def dali_missing() -> Optional[str]:
    from megatron_omni.data import dali

    if not dali.available():
        return "nvidia-dali is not installed (pip install nvidia-dali-cuda130; the NGC container has it)"
    return None


def have_av() -> bool:
    return importlib.util.find_spec("av") is not None


def plan(ctx: CheckContext) -> Dict[str, Dict]:
    importlib.import_module("megatron_omni.data.media.synth")  # the check's imports resolve

    return {"dali_gpu_vs_cpu_decode": {"media": ["png", "jpg"] + (["vp9", "h264", "wav"] if have_av() else []),
                                       "skip_reason": dali_missing(),
                                       "without_pyav": None if have_av() else "video and audio parts skipped"}}


def _diff(a, b) -> Dict[str, float]:
    d = (a.float() - b.float()).abs()
    return {"mean_abs": float(d.mean()), "max_abs": float(d.max())}


def _check(ctx: CheckContext) -> CheckResult:
    from megatron_omni.data import dali
    from megatron_omni.data.media import synth
    from megatron_omni.data.media.image import load_image
    from megatron_omni.config.encoders import VisionConfig

    vision = VisionConfig.from_yaml(config_path("model", "vision_tiny.yaml"))
    numbers: Dict[str, Dict] = {"dali_device": dali.device()}
    ok = True
    rgb = synth.smooth_rgb(280, 392)
    for ext in ("png", "jpg"):
        path = ctx.path("dali", f"image.{ext}")
        synth.write_image(path, rgb)
        a = load_image(path, vision=vision, max_tokens=4096, backend="dali")
        b = load_image(path, vision=vision, max_tokens=4096, backend="pil")
        d = {**_diff(a.pixel_values, b.pixel_values), "same_grid": bool((a.grid_thw == b.grid_thw).all())}
        numbers[ext] = d
        ok = ok and d["same_grid"] and d["mean_abs"] <= IMAGE_TOL_MEAN and d["max_abs"] <= IMAGE_TOL_MAX
    if have_av():
        from megatron_omni.data.media.audio import load_waveform
        from megatron_omni.data.media.video import load_video

        clip = synth.smooth_clip(8, 112, 112)
        for codec, ext in (("vp9", "webm"), ("h264", "mp4")):
            if not dali.video_codec_supported(codec):
                numbers[codec] = {"skipped": f"DALI on {dali.device()} does not decode {codec}"}
                continue
            path = ctx.path("dali", f"clip_{codec}.{ext}")
            synth.write_video(path, clip, 8.0, codec)
            a = load_video(path, vision=vision, max_frames=8, max_tokens=4096, backend="dali")
            b = load_video(path, vision=vision, max_frames=8, max_tokens=4096, backend="pyav")
            d = {**_diff(a.pixel_values, b.pixel_values), "same_grid": bool((a.grid_thw == b.grid_thw).all())}
            numbers[codec] = d
            ok = ok and d["same_grid"] and d["mean_abs"] <= VIDEO_TOL_MEAN and d["max_abs"] <= VIDEO_TOL_MAX
        path = ctx.path("dali", "chirp.wav")
        synth.write_audio(path, synth.chirp(1.0, 16000), 16000)
        a, b = load_waveform(path, backend="dali"), load_waveform(path, backend="pyav")
        d = _diff(a, b) if a.shape == b.shape else {"max_abs": float("inf"), "shapes": [list(a.shape), list(b.shape)]}
        numbers["wav"] = d
        ok = ok and d["max_abs"] <= AUDIO_TOL
    else:
        numbers["video_audio"] = {"skipped": "PyAV is not installed (it writes the clips and is the CPU reference)"}
    parts = ", ".join(f"{k} mean {v['mean_abs']:.1e} max {v['max_abs']:.1e}" for k, v in numbers.items()
                      if isinstance(v, dict) and "mean_abs" in v)
    return judged("dali_gpu_vs_cpu_decode", ok, f"DALI ({numbers['dali_device']}) vs PIL/PyAV: {parts}", **numbers)


def run(ctx: CheckContext, emit: Callable[[CheckResult], None]) -> None:
    from megatron_omni.gpu_check.worker import guarded

    why = dali_missing()
    emit(skipped(CHECKS[0], why) if why else guarded(CHECKS[0], lambda: _check(ctx)))
