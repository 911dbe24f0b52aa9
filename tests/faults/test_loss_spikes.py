"""Loss spikes (training/loss_spikes.py): the data side names the samples of every microbatch
(OmniMicrobatch.sample_ids, host metadata), the reference is the median of the last steps.  The
multi-process runs that force a spike and check the logged ids against the step's samples are
in test_layout_resume.py (omni, DP2 and a resume at TP2 x DP1) and test_injected_faults.py (text, DP2)."""

from __future__ import annotations

import statistics

import pytest
import torch

from megatron_omni.config import ConfigError, load_config, validate
from megatron_omni.data.modality_stream import LoaderConfig, ModalitySpec
from megatron_omni.data.omni_loader import OmniLoader
from megatron_omni.data.synthetic import SyntheticSource
from megatron_omni.models.omni_vocab import OmniVocab
from megatron_omni.training.loss_spikes import LossSpikeDetector

VOCAB = OmniVocab(text_vocab_size=2000, audio_codebook_size=64)


def test_packed_microbatches_name_exactly_their_samples_in_order():
    source = SyntheticSource("image", 400, vocab=VOCAB, seed=5, seq_length=1024)
    reference = SyntheticSource("image", 400, vocab=VOCAB, seed=5, seq_length=1024)  # regenerates by index
    config = LoaderConfig(seq_length=1024, micro_batch_size=2, lookahead=8, prefetch=1, seed=3)
    with OmniLoader({"image": ModalitySpec([source])}, config, dp_rank=1, dp_size=2) as loader:
        batches = [loader.next_microbatch("image") for _ in range(4)]
    seen = []
    for batch in batches:
        bounds = batch.cu_seqlens.tolist()
        for r, ids in enumerate(batch.sample_ids):
            starts = [b for b in bounds if r * 1024 <= b < (r + 1) * 1024]
            assert len(ids) >= 1 and len(starts) >= len(ids)
            for start, sample_id in zip(starts, ids):  # each segment holds the sample the id names
                expected = reference[int(sample_id.split(":")[1])].tokens
                assert torch.equal(batch.tokens.view(-1)[start:start + expected.numel()], expected), sample_id
            seen += ids
    assert len(seen) == len(set(seen)) and len(seen) > 8  # several samples per row, none twice


def test_the_reference_is_the_median_of_a_full_window():
    recent = []
    detector = LossSpikeDetector(3.0, 4, recent)
    losses = [5.0, 4.0, 30.0, 3.9, 3.8, 12.0, 3.5, 40.0, 45.0, 50.0]
    verdicts = [detector.check(x) for x in losses]
    expected = []
    for i, x in enumerate(losses):
        window = losses[max(0, i - 4):i]
        ok = len(window) == 4 and x > 3.0 * statistics.median(window)
        expected.append(statistics.median(window) if ok else None)
    assert verdicts == expected
    assert verdicts[5] == statistics.median([4.0, 30.0, 3.9, 3.8])  # the step-3 spike did not lift it
    assert verdicts[9] is None  # after a lasting shift the median follows: not flagged for ever
    assert recent == losses[-4:]  # the checkpointed window
    assert detector.check(float("nan")) is None and recent == losses[-4:]


@pytest.mark.parametrize("value", ["1.0", "0", "-2"])
def test_loss_spike_factor_must_exceed_one(value):
    cfg = load_config("configs/tiny/llm.yaml", [f"train.loss_spike_factor={value}"])
    with pytest.raises(ConfigError, match=r"train.loss_spike_factor=.* must be a number > 1"):
        validate(cfg, 1)
