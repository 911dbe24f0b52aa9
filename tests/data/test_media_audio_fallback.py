"""torchaudio is optional for audio loading (issue 18): without it, resampling falls back to FFmpeg's
swresample (PyAV) with one log line, and the waveform matches torchaudio's resampling."""

from __future__ import annotations

import logging
import sys

import numpy as np
import torch
import torchaudio

from megatron_omni.data.media import load_waveform, synth
from megatron_omni.data.media import backends


def test_fallback_resampler_when_torchaudio_does_not_import(tmp_path, monkeypatch, caplog):
    rate = 44100
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)).astype(np.float32)
    path = tmp_path / "tone.wav"
    synth.write_audio(path, tone, rate)
    reference = torchaudio.functional.resample(torch.from_numpy(tone), rate, 16000)

    monkeypatch.setitem(sys.modules, "torchaudio", None)  # `import torchaudio` raises ImportError
    monkeypatch.setattr(backends, "_logged", set())
    with caplog.at_level(logging.INFO):
        wave = load_waveform(str(path), backend="pyav")
        load_waveform(str(path), backend="pyav")
    lines = [r.getMessage() for r in caplog.records if "torchaudio does not import" in r.getMessage()]
    assert len(lines) == 1 and "FFmpeg swresample" in lines[0]
    assert wave.dtype == torch.float32 and wave.numel() == reference.numel() == 16000
    # tone of amplitude 0.5: the two sinc resamplers agree to ~1e-4 away from the clip edges
    assert (wave - reference)[400:-400].abs().max() < 2e-3
