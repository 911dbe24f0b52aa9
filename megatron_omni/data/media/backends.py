"""Which decoder handles a file: DALI when it can, else PIL (images) / PyAV (video, audio).

The choice is automatic per media kind, file type and what is installed, and logged once per
(kind, backend) with the reason.  Force one with the loaders' `backend=` argument or the environment:

    MEGATRON_OMNI_IMAGE_BACKEND = dali | pil
    MEGATRON_OMNI_VIDEO_BACKEND = dali | pyav
    MEGATRON_OMNI_AUDIO_BACKEND = dali | pyav

A forced backend that cannot read a file (DALI CPU given H.264, DALI given MP3) raises MediaError.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Optional, Tuple

from megatron_omni.data import dali

logger = logging.getLogger("megatron_omni.data.media")

BACKENDS = {"image": ("dali", "pil"), "video": ("dali", "pyav"), "audio": ("dali", "pyav")}
ENV = {kind: f"MEGATRON_OMNI_{kind.upper()}_BACKEND" for kind in BACKENDS}
# PIL format names of the image types DALI's decoder (nvImageCodec) reads; others (GIF, ...) use PIL.
DALI_IMAGE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "JPEG2000", "PPM"})
# Containers DALI's audio decoder (libsndfile) reads; MP3 / AAC / M4A go through PyAV.
DALI_AUDIO_FORMATS = frozenset({"wav", "flac", "ogg"})

_logged = set()
_lock = threading.Lock()


def requested(kind: str, backend: Optional[str]) -> Optional[str]:
    """The backend forced by argument or environment (argument wins), validated; None = automatic."""
    name = backend or os.environ.get(ENV[kind], "").strip().lower() or None
    if name is not None and name not in BACKENDS[kind]:
        raise ValueError(f"{kind} backend {name!r} is not one of {BACKENDS[kind]} (argument or {ENV[kind]})")
    if name == "dali" and not dali.available():
        raise ValueError(f"{kind} backend 'dali' was forced but nvidia-dali is not installed "
                         f"(pip install nvidia-dali-cuda130, or unset {ENV[kind]})")
    return name


def log_once(kind: str, backend: str, reason: str) -> None:
    with _lock:
        if (kind, backend) in _logged:
            return
        _logged.add((kind, backend))
    logger.info("%s decoding: %s (%s)", kind, backend, reason)


def choose_image(fmt: str, backend: Optional[str]) -> Tuple[str, bool]:
    """fmt: PIL's format name from the header.  (backend, usable) as in choose_video."""
    forced = requested("image", backend)
    supported = dali.available() and fmt in DALI_IMAGE_FORMATS
    if forced:
        name, reason = forced, "forced"
    elif supported:
        name, reason = "dali", f"DALI {dali.device()} decoder{' (nvJPEG)' if dali.device() == 'gpu' else ''}"
    elif dali.available():
        name, reason = "pil", f"DALI does not decode {fmt} images"
    else:
        name, reason = "pil", "nvidia-dali not installed"
    log_once("image", name, reason)
    return name, name != "dali" or supported


def choose_video(codec: str, backend: Optional[str]) -> Tuple[str, bool]:
    """(backend, usable): usable is False when a forced DALI cannot decode this codec."""
    forced = requested("video", backend)
    supported = dali.available() and dali.video_codec_supported(codec)
    if forced:
        name, reason = forced, "forced"
    elif supported:
        name = "dali"
        reason = f"DALI {dali.device()} decoder{' (NVDEC)' if dali.device() == 'gpu' else ''} for {codec}"
    elif dali.available():
        name, reason = "pyav", f"DALI's {dali.device()} video decoder does not support {codec}"
    else:
        name, reason = "pyav", "nvidia-dali not installed"
    log_once("video", name, reason)
    return name, name != "dali" or supported


def sniff_audio(data: bytes) -> str:
    """Container type from magic bytes: wav, flac, ogg, mp3 or other."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "wav"
    if data[:4] == b"fLaC":
        return "flac"
    if data[:4] == b"OggS":
        return "ogg"
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        return "mp3"
    return "other"


def check_wav_complete(data: bytes) -> None:
    """Raise ValueError when a WAV file's data chunk declares more bytes than the file holds.

    Decoders return a cut-off WAV's remaining samples without complaint; a truncated download should
    be counted as bad media instead.  Streaming writers' placeholder sizes (0, 0xFFFFFFFF) are accepted.
    """
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if chunk == b"data":
            available = len(data) - pos - 8
            if 0 < size < 0xFFFFFFFF and size > available:
                raise ValueError(f"truncated WAV: data chunk declares {size} bytes, the file holds {available}")
            return
        pos += 8 + size + (size & 1)
    raise ValueError("WAV file has no data chunk")


def choose_audio(fmt: str, backend: Optional[str]) -> Tuple[str, bool]:
    forced = requested("audio", backend)
    supported = dali.available() and fmt in DALI_AUDIO_FORMATS
    if forced:
        name, reason = forced, "forced"
    elif supported:
        name, reason = "dali", "DALI CPU decoder (libsndfile)"
    elif dali.available():
        name, reason = "pyav", f"DALI's audio decoder does not read {fmt} files"
    else:
        name, reason = "pyav", "nvidia-dali not installed"
    log_once("audio", name, reason + "; resampling with torchaudio")
    return name, name != "dali" or supported
