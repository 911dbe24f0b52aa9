"""Write synthetic images, video clips and audio clips (demo data, tests, benchmarks).

Encoders used (checked against the PyAV 18.1 wheel, which bundles its own FFmpeg 8):
    images  .jpg / .jpeg (PIL, quality 95, 4:4:4), .png (PIL)
    video   'vp9'   -> libvpx-vp9 in WebM (.webm)    decodable by DALI's CPU video decoder
            'vp8'   -> libvpx in WebM (.webm)         decodable by DALI's CPU video decoder
            'mjpeg' -> FFmpeg mjpeg in Matroska (.mkv) decodable by DALI's CPU video decoder
            'h264'  -> libx264 in MP4 (.mp4)          CPU machines decode it with PyAV
    audio   .wav (16-bit PCM, stdlib `wave`), .flac (FFmpeg flac, s16), .opus (libopus in Ogg),
            .ogg (FFmpeg's native Vorbis encoder in Ogg; the wheel has no libvorbis), .mp3 (libmp3lame)

Bytes are deterministic for a given input (single-threaded encoders, FFmpeg's bitexact flags so no
library version string, random Ogg stream serial or timestamp lands in the file) for every format
except H.264: libx264 (threads=1) was measured to give a different bitstream in about one process in
three for identical input, so .mp4 files are reproducible only up to codec error (~2 levels of 255).
"""

from __future__ import annotations

import os
import wave
from fractions import Fraction
from typing import Dict, Tuple

import numpy as np

# codec name -> (FFmpeg encoder, container extensions it may be written to, encoder options)
VIDEO_CODECS: Dict[str, Tuple[str, Tuple[str, ...], Dict[str, str]]] = {
    # crf 10 / qp-like settings keep codec error small (a few 8-bit levels on smooth content):
    # the tests compare frames decoded from different codecs of the same clip.
    "vp9": ("libvpx-vp9", (".webm", ".mkv"), {"crf": "10", "b": "0", "deadline": "good", "cpu-used": "4",
                                             "row-mt": "0", "threads": "1"}),
    "vp8": ("libvpx", (".webm", ".mkv"), {"crf": "4", "b": "20M", "deadline": "good", "cpu-used": "4",
                                          "threads": "1"}),
    "h264": ("libx264", (".mp4", ".mkv"), {"crf": "10", "preset": "fast",
                                           "x264-params": "threads=1:lookahead-threads=1"}),
    "mjpeg": ("mjpeg", (".mkv", ".avi"), {"q": "2", "threads": "1"}),
}

# audio extension -> (FFmpeg encoder, sample format, encoder options)
AUDIO_CODECS: Dict[str, Tuple[str, str, Dict[str, str]]] = {
    ".flac": ("flac", "s16", {}),
    ".opus": ("libopus", "s16", {"b": "96000"}),
    ".mp3": ("libmp3lame", "s16p", {"b": "128000"}),  # not readable by DALI: exercises the PyAV path
    # FFmpeg's own Vorbis encoder is experimental and stereo-only; it is the only Vorbis encoder in the
    # wheel, so .ogg files carry the mono wave on both channels (decoders downmix them back).
    ".ogg": ("vorbis", "fltp", {"strict": "-2", "q": "6"}),
}
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


def _ext(path) -> str:
    return os.path.splitext(os.fspath(path))[1].lower()


def write_image(path, rgb: np.ndarray) -> None:
    """Write an [H, W, 3] uint8 RGB array as .jpg/.jpeg (quality 95, no chroma subsampling) or .png."""
    from PIL import Image

    rgb = _check_uint8(rgb, ndim=3, what="image")
    image = Image.fromarray(rgb, mode="RGB")
    ext = _ext(path)
    if ext in (".jpg", ".jpeg"):
        image.save(path, format="JPEG", quality=95, subsampling=0)
    elif ext == ".png":
        image.save(path, format="PNG")
    else:
        raise ValueError(f"write_image: unsupported extension {ext!r} for {path} (use .jpg, .jpeg or .png)")


def write_video(path, frames: np.ndarray, fps: float, codec: str) -> None:
    """Encode [T, H, W, 3] uint8 RGB frames at `fps` with `codec` ('vp9', 'vp8', 'h264', 'mjpeg').

    H and W must be even (4:2:0 chroma).  The container follows the extension (see VIDEO_CODECS).
    """
    import av

    frames = _check_uint8(frames, ndim=4, what="video")
    t, h, w, _ = frames.shape
    if t == 0:
        raise ValueError(f"write_video: no frames for {path}")
    if h % 2 or w % 2:
        raise ValueError(f"write_video: frame size {h}x{w} must be even for 4:2:0 chroma ({path})")
    if codec not in VIDEO_CODECS:
        raise ValueError(f"write_video: unknown codec {codec!r}; choose one of {sorted(VIDEO_CODECS)}")
    encoder, extensions, options = VIDEO_CODECS[codec]
    if _ext(path) not in extensions:
        raise ValueError(f"write_video: codec {codec!r} goes in {' / '.join(extensions)} files, got {path}")
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(os.fspath(path), mode="w", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(encoder, rate=rate, options=dict(options))
        stream.width, stream.height = w, h
        stream.codec_context.thread_count = 1  # multi-threaded encoders are not bit-reproducible
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            frame.pts = i
            frame.time_base = 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def write_audio(path, wave_data: np.ndarray, sample_rate: int) -> None:
    """Write a mono float waveform in [-1, 1] as .wav (s16 PCM), .flac, .opus, .ogg (Vorbis) or .mp3.

    Opus supports only 8/12/16/24/48 kHz: other rates are rejected rather than silently resampled.
    """
    samples = np.asarray(wave_data, dtype=np.float32)
    if samples.ndim != 1 or samples.size == 0:
        raise ValueError(f"write_audio: expected a non-empty 1-D waveform for {path}, got shape {samples.shape}")
    pcm16 = (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype(np.int16)
    ext = _ext(path)
    if ext == ".wav":
        with wave.open(os.fspath(path), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(int(sample_rate))
            out.writeframes(pcm16.tobytes())
        return
    if ext not in AUDIO_CODECS:
        raise ValueError(f"write_audio: unsupported extension {ext!r} for {path} (.wav, .flac, .opus, .ogg, .mp3)")
    if ext == ".opus" and sample_rate not in OPUS_RATES:
        raise ValueError(f"write_audio: Opus needs a sample rate in {OPUS_RATES}, got {sample_rate} ({path})")
    _encode_audio(path, samples, pcm16, int(sample_rate), *AUDIO_CODECS[ext])


def _encode_audio(path, samples: np.ndarray, pcm16: np.ndarray, rate: int, encoder: str, sample_fmt: str,
                  options: Dict[str, str]) -> None:
    import av

    fmt = "ogg" if _ext(path) in (".opus", ".ogg") else None
    with av.open(os.fspath(path), mode="w", format=fmt, options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(encoder, rate=rate, options=dict(options))
        layout = "stereo" if encoder == "vorbis" else "mono"
        stream.layout = layout
        stream.format = sample_fmt
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        data = pcm16[None, :] if sample_fmt.startswith("s16") else samples[None, :]
        if layout == "stereo":
            data = np.repeat(data, 2, axis=0)
        frame_size = stream.codec_context.frame_size or 4096
        # Feed whole encoder frames: Vorbis / Opus reject partial ones except the last.
        for start in range(0, data.shape[1], frame_size):
            chunk = np.ascontiguousarray(data[:, start:start + frame_size])
            frame = av.AudioFrame.from_ndarray(chunk, format=sample_fmt, layout=layout)
            frame.sample_rate = rate
            frame.pts = start
            frame.time_base = Fraction(1, rate)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _check_uint8(array: np.ndarray, *, ndim: int, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != ndim or array.shape[-1] != 3:
        raise ValueError(f"{what} must be uint8 with shape [{'T, ' if ndim == 4 else ''}H, W, 3], "
                         f"got {array.dtype} {array.shape}")
    return np.ascontiguousarray(array)


def smooth_rgb(height: int, width: int, phase: float = 0.0) -> np.ndarray:
    """A smooth, compressible RGB test pattern (gradients + low-frequency waves), uint8 [H, W, 3].

    `phase` shifts the waves so consecutive video frames differ (and frame order is recoverable).
    """
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y /= max(height - 1, 1)
    x /= max(width - 1, 1)
    r = 0.5 + 0.4 * np.sin(2 * np.pi * (x + phase))
    g = 0.5 + 0.4 * np.cos(2 * np.pi * (y - 0.5 * phase))
    b = 0.2 + 0.6 * x * y
    return (np.stack([r, g, b], axis=-1) * 255.0).round().astype(np.uint8)


def smooth_clip(num_frames: int, height: int, width: int) -> np.ndarray:
    """`num_frames` frames of `smooth_rgb` with a phase step per frame, uint8 [T, H, W, 3]."""
    return np.stack([smooth_rgb(height, width, phase=i / max(num_frames, 1)) for i in range(num_frames)])


def chirp(seconds: float, sample_rate: int, f0: float = 200.0, f1: float = 3000.0, amplitude: float = 0.5
          ) -> np.ndarray:
    """A linear frequency sweep f0 -> f1 (float32, mono): broadband enough to exercise every mel bin."""
    t = np.arange(int(round(seconds * sample_rate)), dtype=np.float64) / sample_rate
    k = (f1 - f0) / max(seconds, 1e-9)
    return (amplitude * np.sin(2 * np.pi * (f0 * t + 0.5 * k * t * t))).astype(np.float32)
