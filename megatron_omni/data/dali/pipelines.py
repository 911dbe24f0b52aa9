"""Per-thread DALI pipelines (batch size 1, inputs fed per call) and the calls that run them.

GPU path (device "gpu": decoders with device="mixed", resize on the GPU) is written against DALI 2.4's
documented API but has NOT been run: the development machine and CI have no GPU.  The CPU path is what
the tests and benchmarks/decode_throughput.py exercise.
"""

from __future__ import annotations

import os
import threading
from functools import lru_cache
from typing import Dict, Sequence, Tuple

import numpy as np
import torch

# FFmpeg codec names DALI's video decoder accepts (fn.decoders.video docs, DALI 2.4).
CPU_VIDEO_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
GPU_VIDEO_CODECS = CPU_VIDEO_CODECS | {"h264", "hevc", "av1", "mpeg4"}
DEVICE_ENV = "MEGATRON_OMNI_DALI_DEVICE"


class DaliDecodeError(RuntimeError):
    """DALI could not decode the input (corrupt, truncated or unsupported data)."""


@lru_cache(maxsize=1)
def available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=1)
def device() -> str:
    """'gpu' or 'cpu': where image / video decoding and resizing run."""
    forced = os.environ.get(DEVICE_ENV, "").strip().lower()
    if forced in ("cpu", "gpu"):
        return forced
    if forced:
        raise ValueError(f"{DEVICE_ENV}={forced!r}: use 'cpu' or 'gpu'")
    return "gpu" if torch.cuda.is_available() else "cpu"


def video_codec_supported(codec: str) -> bool:
    return codec in (GPU_VIDEO_CODECS if device() == "gpu" else CPU_VIDEO_CODECS)


_local = threading.local()  # DALI pipelines are not thread-safe: one set per thread


def rank_device_index() -> int:
    """This rank's GPU: LOCAL_RANK, the device `parallel/initialize.py` selects for the main thread.
    A prefetch or DataLoader thread starts on device 0 whatever the main thread chose (the CUDA
    device is per thread), so decode threads must not read `torch.cuda.current_device()`."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def _select_thread_device() -> None:
    """GPU decoding: this thread's CUDA device := the rank's, once per thread (DALI outputs are copied
    into torch tensors on the current device and stream)."""
    if getattr(_local, "device_index", None) is None:
        _local.device_index = rank_device_index()
        torch.cuda.set_device(_local.device_index)


def _pipeline(kind: str):
    pipes: Dict[Tuple[str, str], object] = _local.__dict__.setdefault("pipes", {})
    key = (kind, device())
    if key not in pipes:
        if device() == "gpu":
            _select_thread_device()
        pipes[key] = _BUILDERS[kind](device())
    return pipes[key]


def pipeline_device_id(dev: str):
    """DALI `device_id`: the rank's GPU for the GPU path, None (CPU-only operators) otherwise."""
    return rank_device_index() if dev == "gpu" else None


def _new_pipeline(dev: str):
    from nvidia.dali import Pipeline

    device_id = pipeline_device_id(dev)
    # prefetch_queue_depth=1 lets run() take named inputs; one worker thread per pipeline because the
    # omni loader parallelises over samples (DataLoader workers), not inside one decode.
    return Pipeline(batch_size=1, num_threads=1, device_id=device_id, prefetch_queue_depth=1,
                    exec_dynamic=True)


def _build_image(dev: str):
    from nvidia.dali import fn, types

    pipe = _new_pipeline(dev)
    with pipe:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
        image = fn.decoders.image(encoded, device="mixed" if dev == "gpu" else "cpu", output_type=types.RGB)
        pipe.set_outputs(fn.resize(image, size=size, interp_type=types.INTERP_CUBIC, antialias=True))
    pipe.build()
    return pipe


def _build_video(dev: str):
    from nvidia.dali import fn, types

    pipe = _new_pipeline(dev)
    with pipe:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
        video = fn.decoders.video(encoded, device="mixed" if dev == "gpu" else "cpu", frames=frames)
        pipe.set_outputs(fn.resize(video, size=size, interp_type=types.INTERP_CUBIC, antialias=True))
    pipe.build()
    return pipe


def _build_audio(dev: str):
    from nvidia.dali import fn, types

    pipe = _new_pipeline("cpu")  # DALI's audio decoder is CPU-only
    with pipe:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        # Decoded at the file's own rate: the decoder's built-in resampler (sample_rate=...) was
        # measured to alias when downsampling (white noise 44.1 -> 16 kHz gains ~2.8x power in every
        # band, i.e. no anti-alias low-pass), so callers resample with torchaudio instead.
        wave, rate = fn.decoders.audio(encoded, downmix=True, dtype=types.FLOAT)
        pipe.set_outputs(wave, rate)
    pipe.build()
    return pipe


_BUILDERS = {"image": _build_image, "video": _build_video, "audio": _build_audio}


def _run(kind: str, **inputs: np.ndarray) -> Tuple[torch.Tensor, ...]:
    pipe = _pipeline(kind)
    try:
        outputs = pipe.run(**{name: [value] for name, value in inputs.items()})
    except RuntimeError as e:
        # A critical error invalidates the pipeline ("Current pipeline object is no longer valid"):
        # drop it so the next call builds a fresh one.
        _local.pipes.pop((kind, device()), None)
        raise DaliDecodeError(_reason(str(e))) from None
    from nvidia.dali.backend import TensorListGPU

    return tuple(_to_torch_gpu(out) if isinstance(out, TensorListGPU) else torch.from_numpy(np.array(out[0]))
                 for out in outputs)


def _to_torch_gpu(out) -> torch.Tensor:
    """Copy a GPU batch-of-1 output into a torch CUDA tensor on the current stream (GPU path: image and
    video outputs are uint8)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    tensor = out.as_tensor()
    shape = tuple(tensor.shape())[1:]  # drop the batch dimension of 1
    dst = torch.empty((1,) + shape, dtype=torch.uint8, device=torch.device("cuda", torch.cuda.current_device()))
    feed_ndarray(tensor, dst, cuda_stream=torch.cuda.current_stream())
    return dst[0]


def _reason(message: str) -> str:
    """The cause in a DALI pipeline error: the text between 'encountered:' and 'C++ context:'."""
    cause = message.split("encountered:", 1)[-1].split("C++ context:", 1)[0]
    cause = " ".join(line.strip() for line in cause.splitlines()
                     if line.strip() and "no longer valid" not in line)
    return f"DALI: {cause}" if cause else "DALI could not decode the data"


def decode_image(data: bytes, size: Tuple[int, int]) -> torch.Tensor:
    """Encoded image -> [H, W, 3] uint8 RGB resized (bicubic, antialiased) to size=(H, W)."""
    return _run("image", encoded=np.frombuffer(data, dtype=np.uint8),
                size=np.asarray(size, dtype=np.float32))[0]


def decode_video(data: bytes, frame_indices: Sequence[int], size: Tuple[int, int]) -> torch.Tensor:
    """Encoded video -> [len(frame_indices), H, W, 3] uint8 RGB frames resized to size=(H, W)."""
    return _run("video", encoded=np.frombuffer(data, dtype=np.uint8),
                frames=np.asarray(frame_indices, dtype=np.int32), size=np.asarray(size, dtype=np.float32))[0]


def decode_audio(data: bytes) -> Tuple[torch.Tensor, int]:
    """Encoded WAV / FLAC / Ogg (Vorbis, Opus) -> ([num_samples] float32 mono in [-1, 1], sample rate).

    Mono is the channel mean.  Not resampled (see _build_audio).
    """
    wave, rate = _run("audio", encoded=np.frombuffer(data, dtype=np.uint8))
    return wave, int(round(float(rate)))


def close_thread_pipelines() -> int:
    """Drop this thread's pipelines (frees their buffers); returns how many there were."""
    return len(_local.__dict__.pop("pipes", {}))
