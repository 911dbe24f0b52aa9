"""NVIDIA DALI decode pipelines for images, video and audio (optional dependency).

    from megatron_omni.data import dali
    if dali.available():
        frames = dali.decode_video(data, frame_indices=[0, 8, 16, 24], size=(224, 336))

Each call decodes one encoded file (bytes) through a small per-thread pipeline built once and reused.
Device: GPU (nvJPEG images, NVDEC video, resize on the GPU) when torch sees CUDA, else DALI's CPU
operators (`device_id=None`).  `MEGATRON_OMNI_DALI_DEVICE=cpu|gpu` overrides.  Audio decoding is a
CPU operator in DALI on every machine.  GPU decoding initialises CUDA in the calling process: use it
from the main process or from DataLoader workers started with the 'spawn' method, never 'fork'.

The GPU path (device="mixed" decoders, GPU resize, copy into torch via feed_ndarray) follows DALI
2.4's documented API but has not been run: no GPU was available while writing it.
"""

from megatron_omni.data.dali.pipelines import (
    CPU_VIDEO_CODECS,
    GPU_VIDEO_CODECS,
    DaliDecodeError,
    available,
    decode_audio,
    decode_image,
    decode_video,
    device,
    video_codec_supported,
)

__all__ = [
    "CPU_VIDEO_CODECS", "GPU_VIDEO_CODECS", "DaliDecodeError", "available", "decode_audio", "decode_image",
    "decode_video", "device", "video_codec_supported",
]
