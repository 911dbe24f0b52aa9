"""load_audio: decode, downmix, resample to 16 kHz, Kaldi log-mel fbank."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from megatron_omni.data import dali
from megatron_omni.data.media.backends import check_wav_complete, choose_audio, log_once, sniff_audio
from megatron_omni.data.media.errors import MediaError, read_bytes
from megatron_omni.data.media.fbank import KALDI_WAVE_SCALE, frame_count, kaldi_fbank
from megatron_omni.data.media.pyav_decode import decode_audio as pyav_decode_audio
from megatron_omni.data.media.pyav_decode import resample_audio as pyav_resample
from megatron_omni.config.encoders import AudioConfig


def load_waveform(path: str, *, sample_rate: int = 16000, backend: Optional[str] = None) -> Tensor:
    """Audio file -> [num_samples] float32 mono in [-1, 1] at `sample_rate`.

    Decoded by DALI (WAV, FLAC, Ogg Vorbis / Opus) or PyAV (everything FFmpeg reads, MP3 included),
    downmixed by channel mean, then resampled with torchaudio's sinc resampler (FFmpeg's without
    torchaudio, see `resample`).
    """
    data = read_bytes(path)
    fmt = sniff_audio(data)
    if fmt == "wav":
        try:
            check_wav_complete(data)
        except ValueError as e:
            raise MediaError(path, str(e)) from None
    name, usable = choose_audio(fmt, backend)
    if not usable:
        raise MediaError(path, f"backend 'dali' cannot decode {fmt} audio (DALI reads wav, flac, ogg)")
    import av

    if name == "dali":
        try:
            wave, rate = dali.decode_audio(data)
        except dali.DaliDecodeError as e:
            raise MediaError(path, str(e)) from None
    else:
        try:
            wave, rate = pyav_decode_audio(data)
        except (av.error.FFmpegError, ValueError) as e:
            raise MediaError(path, f"corrupt or unsupported audio ({e})") from None
        wave = torch.from_numpy(wave)
    if rate != sample_rate:
        # One resampler for every backend (torchaudio's windowed sinc, anti-aliased), so features do
        # not depend on which decoder read the file.
        wave = resample(wave, rate, sample_rate)
    return wave


def resample(wave: Tensor, rate: int, target: int) -> Tensor:
    """torchaudio's sinc resampler, or FFmpeg's (PyAV) when torchaudio does not import (one log line)."""
    try:
        import torchaudio
    except (ImportError, OSError) as e:  # OSError: a wheel whose extension does not match this torch
        log_once("audio resampling", "pyav", f"torchaudio does not import ({e}); FFmpeg swresample instead "
                 "(pip install torchaudio matching this torch for the reference resampler)")
        return torch.from_numpy(pyav_resample(wave.numpy(), rate, target))
    return torchaudio.functional.resample(wave, rate, target)


def load_audio(path: str, *, audio: AudioConfig, sample_rate: int = 16000, backend: Optional[str] = None
               ) -> Tensor:
    """Audio file -> [frames, audio.num_mel_bins] float32 Kaldi log-mel fbank (25 ms window, 10 ms shift).

    Frames are plain fbank frames; low-frame-rate stacking happens in the SAN-M encoder (`lfr_stack`).
    Raises MediaError for missing, corrupt or unsupported files, for clips shorter than one window and
    for clips longer than the encoder's positions table (audio.max_input_frames).
    """
    wave = load_waveform(path, sample_rate=sample_rate, backend=backend)
    if frame_count(wave.numel(), sample_rate) == 0:
        raise MediaError(path, f"audio too short: {wave.numel()} samples at {sample_rate} Hz is less than "
                               f"one 25 ms fbank window")
    frames = frame_count(wave.numel(), sample_rate)
    if frames > audio.max_input_frames:
        raise MediaError(path, f"audio too long: {frames} fbank frames ({wave.numel() / sample_rate:.1f} s) exceed "
                               f"the {audio.encoder_type} encoder's {audio.max_input_frames} "
                               f"(audio.max_source_positions={audio.max_source_positions}); split the clip or "
                               f"raise max_source_positions")
    return kaldi_fbank(wave * KALDI_WAVE_SCALE, num_mel_bins=audio.num_mel_bins, sample_rate=sample_rate)
