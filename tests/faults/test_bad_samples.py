"""Bad samples: a sample that failed once is skipped from memory (not decoded again), counted once
in the tolerance window, kept across a resume, written to bad_samples.jsonl, and the tolerance is a
run-config key (data.max_bad_fraction / data.bad_window) named in the error."""

from __future__ import annotations

import json

import pytest

from megatron_omni.config import ConfigError, load_config, validate
from megatron_omni.data.media import MediaError
from megatron_omni.data.modality_stream import LoaderConfig, ModalitySpec, TooManyBadSamples
from megatron_omni.data.omni_loader import OmniLoader
from megatron_omni.data.synthetic import SyntheticSource
from megatron_omni.models.omni_vocab import OmniVocab

VOCAB = OmniVocab(text_vocab_size=2000, audio_codebook_size=64)
BAD = 3  # one truncated "video" of eight, as in the demo run that stopped


class _CountingSource(SyntheticSource):
    """Counts reads of each index (a decode of the medium)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads = {}

    def __getitem__(self, index):
        self.reads[index] = self.reads.get(index, 0) + 1
        return super().__getitem__(index)


def _loader(source, **cfg):
    config = LoaderConfig(seq_length=1024, micro_batch_size=1, lookahead=2, prefetch=0, seed=7, pack=False, **cfg)
    return OmniLoader({"image": ModalitySpec([source])}, config)


def _source():
    return _CountingSource("image", 8, vocab=VOCAB, seed=3, seq_length=1024, fail=lambda i: i == BAD,
                           error=lambda path: MediaError(path, "truncated stream"))


def test_a_bad_sample_is_decoded_once_counted_once_and_remembered_across_resume(tmp_path):
    source, log = _source(), tmp_path / "bad_samples.jsonl"
    # 1/8 bad > max_bad_fraction 0.1: before, the re-counted sample tripped the window on pass 2
    with _loader(source, bad_window=8, bad_samples_log=str(log)) as loader:
        for _ in range(40):  # 5+ passes over the 8 samples
            loader.next_microbatch("image")
        state = loader.state_dict()
        assert loader.bad_samples() == {"image": 1}
        assert loader.skipped_samples >= 5  # occurrences: once per pass
    assert source.reads[BAD] == 1
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["index"] == BAD and "synthetic://image/3.bin" in rows[0]["sample"]
    assert "truncated stream" in rows[0]["error"]
    resumed_source = _source()
    with _loader(resumed_source, bad_window=8) as resumed:
        resumed.load_state_dict(state)
        for _ in range(16):
            resumed.next_microbatch("image")
    assert BAD not in resumed_source.reads  # known from the checkpoint: never read again


def test_too_many_bad_samples_names_the_run_config_key():
    source = SyntheticSource("image", 40, vocab=VOCAB, seed=3, seq_length=1024, fail=lambda i: i % 2 == 0,
                             error=lambda path: MediaError(path, "truncated stream"))
    with _loader(source, bad_window=10) as loader, pytest.raises(TooManyBadSamples) as err:
        for _ in range(40):
            loader.next_microbatch("image")
    message = str(err.value)
    assert "data.max_bad_fraction=0.1" in message and "data.bad_window=10" in message
    assert "source 0: " in message and "synthetic://image/" in message


def test_max_bad_fraction_is_a_run_config_key():
    cfg = load_config("configs/tiny/llm.yaml", ["data.max_bad_fraction=0.3", "data.bad_window=50"])
    assert (cfg.data.max_bad_fraction, cfg.data.bad_window) == (0.3, 50)
    cfg = load_config("configs/tiny/llm.yaml", ["data.max_bad_fraction=1.5"])
    with pytest.raises(ConfigError, match=r"data.max_bad_fraction=1.5 must be in \[0, 1\]"):
        validate(cfg, 1)
