"""The omni loader: DP sharding, deterministic order, exact resume under prefetch, bad-data skips,
held-out validation, and padding on the realistic length mix."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import fields
from typing import Dict, List, Sequence, Tuple

import pytest
import torch

from megatron_omni.data.media import MediaError
from megatron_omni.data.modality_stream import LoaderConfig, ModalitySpec, TooManyBadSamples
from megatron_omni.data.omni_batch import OmniMicrobatch
from megatron_omni.data.omni_loader import OmniLoader
from megatron_omni.data.sample_order import SampleOrder
from megatron_omni.data.synthetic import MODALITIES, SyntheticSource
from megatron_omni.models.omni_vocab import OmniVocab

VOCAB = OmniVocab(text_vocab_size=2000, audio_codebook_size=64)
S = 1024
PREFIX = 24  # leading tokens that identify a synthetic sample (random text ids)


def _specs(size: int = 60, *, fail=lambda i: False, validation_size: int = 4,
           modalities: Sequence[str] = ("text", "image", "audio")) -> Dict[str, ModalitySpec]:
    return {
        m: ModalitySpec([SyntheticSource(m, size, vocab=VOCAB, seed=3, seq_length=S, fail=fail,
                                         error=lambda path: MediaError(path, "truncated stream"))],
                        validation_size=validation_size)
        for m in modalities
    }


def _loader(specs, *, dp_rank=0, dp_size=1, **cfg) -> OmniLoader:
    config = dict(seq_length=S, micro_batch_size=2, lookahead=16, prefetch=2, seed=7)
    config.update(cfg)
    return OmniLoader(specs, LoaderConfig(**config), dp_rank=dp_rank, dp_size=dp_size)


def _index(specs: Dict[str, ModalitySpec]) -> Dict[Tuple, Tuple[str, int]]:
    """token prefix -> (modality, sample index), over every sample of every source."""
    out = {}
    for m, spec in specs.items():
        src = spec.sources[0]
        for i in range(len(src)):
            if not src.fail(i):
                out[tuple(src[i].tokens[:PREFIX].tolist())] = (m, i)
    return out


def _sample_keys(mb: OmniMicrobatch, index) -> List[Tuple[str, int]]:
    keys = []
    S_ = mb.tokens.shape[1]
    cu = mb.cu_seqlens.tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        row, start = divmod(a, S_)
        if mb.loss_mask[row, start:start + (b - a)].any():
            keys.append(index[tuple(mb.tokens[row, start:start + PREFIX].tolist())])
    return keys


def _assert_same(a: OmniMicrobatch, b: OmniMicrobatch) -> None:
    for f in fields(OmniMicrobatch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f.name
        else:
            assert x == y, f.name


# ------------------------------------------------------------------------- order and DP sharding
def test_sample_order_shards_interleave_to_the_whole_epoch():
    kwargs = dict(seed=5, modality="image", validation_size=6)
    whole = SampleOrder([50, 30], [2.0, 1.0], **kwargs)
    shards = [SampleOrder([50, 30], [2.0, 1.0], dp_rank=r, dp_size=3, **kwargs) for r in range(3)]
    valid = set(whole.validation_keys())
    assert len(valid) == 6 and {s for s, _ in valid} == {0, 1}  # split 4:2 by weight
    assert sorted(k for sh in shards for k in sh.validation_keys()) == sorted(valid)
    for epoch in range(3):
        full = whole.epoch_keys(epoch)
        parts = [sh.epoch_keys(epoch) for sh in shards]
        # Rank r holds positions r, r+3, ...: interleaving the shards gives back the epoch.
        interleaved = torch.empty_like(full)
        for r, part in enumerate(parts):
            interleaved[r::3] = part
        assert torch.equal(interleaved, full)
        keys = [tuple(k) for k in full.tolist()]
        assert not valid & set(keys), "held-out samples are never trained on"
        per_source = [sum(1 for s, _ in keys if s == i) for i in range(2)]
        assert per_source == [49, 25]  # 74 training samples split 2:1 by weight
    # Each source cycles through its whole pool before repeating a sample: after 28 epochs source 1
    # (25 draws an epoch from a pool of 28) has drawn every sample exactly 25 times.
    draws = torch.cat([whole.epoch_keys(e) for e in range(28)])
    counts = torch.bincount(draws[draws[:, 0] == 1, 1], minlength=30)
    assert sorted(set(counts.tolist())) == [0, 25] and int((counts == 0).sum()) == 2  # 2 held out
    assert torch.equal(whole.epoch_keys(1), SampleOrder([50, 30], [2.0, 1.0], **kwargs).epoch_keys(1))
    assert not torch.equal(whole.epoch_keys(0), whole.epoch_keys(1))
    assert not torch.equal(whole.epoch_keys(0), SampleOrder([50, 30], [2.0, 1.0], **{**kwargs, "seed": 6}).epoch_keys(0))


def test_dp_ranks_read_disjoint_shards_that_cover_the_training_set():
    specs = _specs(modalities=("image",))
    index = _index(specs)
    seen = []
    for rank in range(2):
        with _loader(specs, dp_rank=rank, dp_size=2, pack=False) as loader:
            # pad-to-longest reads exactly micro_batch_size samples per microbatch: 28 = one epoch
            keys = [k for _ in range(14) for k in _sample_keys(loader.next_microbatch("image"), index)]
        assert len(keys) == len(set(keys)) == 28
        seen.append(set(keys))
    valid = {("image", i) for _, i in SampleOrder([60], [1.0], seed=7, modality="image", validation_size=4).validation_keys()}
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {("image", i) for i in range(60)} - valid


def test_same_arguments_give_the_same_microbatches_with_or_without_prefetch():
    """TP ranks and first/last pipeline stages of one DP rank build their own loaders."""
    specs = _specs()
    with _loader(specs, prefetch=0) as a, _loader(specs, prefetch=3, decode_workers=2) as b:
        for step in range(12):
            modality = ("image", "text", "audio", "image")[step % 4]
            _assert_same(a.next_microbatch(modality), b.next_microbatch(modality))


# ------------------------------------------------------------------------- resume
def test_resume_mid_epoch_with_prefetch_gives_the_identical_continuation():
    specs = _specs(size=40, fail=lambda i: i % 13 == 5)
    pattern = ["image", "text", "image", "audio", "text"]
    with _loader(specs, prefetch=3, decode_workers=2) as loader:
        for step in range(9):
            loader.next_microbatch(pattern[step % 5])
        # Let the prefetch threads run ahead: the state must still be the consumed position.
        for m in loader.modalities:
            p = loader._prefetch[m]
            while p._queue is not None and not p._queue.full():
                time.sleep(0.01)
        state = json.loads(json.dumps(loader.state_dict()))  # plain data, checkpoint-safe
        expected = [loader.next_microbatch(pattern[step % 5]) for step in range(9, 40)]  # crosses epochs
        expected_skips = loader.skipped_by_reason()
    for prefetch in (0, 2):
        with _loader(specs, prefetch=prefetch) as resumed:
            resumed.load_state_dict(state)
            for step, want in zip(range(9, 40), expected):
                _assert_same(resumed.next_microbatch(pattern[step % 5]), want)
            assert resumed.skipped_by_reason() == expected_skips


def test_pausing_for_a_checkpoint_keeps_the_sequence_and_decodes_nothing_again():
    """`pause_prefetch` (before megatron's checkpoint writer forks) stops the threads but keeps what
    they built: the sequence is the uninterrupted one and no sample is built twice (the old pause
    rewound every stream and decoded its packing buffer again)."""
    from collections import Counter

    pattern = ["image", "text", "audio"]
    with _loader(_specs(size=200), prefetch=0) as a:
        expected = [a.next_microbatch(pattern[step % 3]) for step in range(12)]
    builds = Counter()
    specs = {m: ModalitySpec([SyntheticSource(m, 200, vocab=VOCAB, seed=3, seq_length=S,
                                              fail=lambda i, m=m: builds.update([(m, i)]) and False)],
                             validation_size=4) for m in pattern}
    with _loader(specs, prefetch=3, decode_workers=2) as loader:
        got = [loader.next_microbatch(pattern[step % 3]) for step in range(6)]
        for m in loader.modalities:  # let the threads run ahead, then pause them
            p = loader._prefetch[m]
            while p._queue is not None and not p._queue.full():
                time.sleep(0.01)
        loader.pause_prefetch()
        assert all(p._thread is None for p in loader._prefetch.values())
        got += [loader.next_microbatch(pattern[step % 3]) for step in range(6, 12)]
    for x, y in zip(got, expected):
        _assert_same(x, y)
    assert builds and max(builds.values()) == 1, [k for k, n in builds.items() if n > 1]


def test_resume_rejects_a_different_data_parallel_layout():
    specs = _specs(modalities=("text",))
    with _loader(specs, dp_size=2) as loader:
        loader.next_microbatch("text")
        state = loader.state_dict()
    with _loader(specs, dp_size=1) as other, pytest.raises(ValueError, match="dp_size: saved 2 vs now 1"):
        other.load_state_dict(state)


# ------------------------------------------------------------------------- bad data
def test_bad_samples_are_skipped_counted_and_logged_once(caplog):
    bad = lambda i: i % 20 == 7  # noqa: E731 - 3 of 60 samples
    specs = _specs(fail=bad, modalities=("image",))
    index = _index(specs)
    with caplog.at_level(logging.WARNING, logger="megatron_omni.data"):
        with _loader(specs, pack=False) as loader:
            keys = [k for _ in range(60) for k in _sample_keys(loader.next_microbatch("image"), index)]
            state = loader.state_dict()["image"]
            skipped = loader.skipped_samples
            metrics = loader.metrics()
    # 120 samples trained on, over ~4 epochs of 56: each epoch skips the 3 bad ones again.
    assert len(keys) == 120 and not any(bad(i) for _, i in keys)
    order = SampleOrder([60], [1.0], seed=7, modality="image", validation_size=4)
    read = torch.cat([order.epoch_keys(e) for e in range(state["epoch"])] + [order.epoch_keys(state["epoch"])[:state["cursor"]]])
    n_bad = sum(bad(i) for _, i in read.tolist())
    assert n_bad >= 6 and skipped == n_bad == metrics["skipped_samples"]
    assert loader.skipped_by_reason() == {"image/" + MediaError.__name__: n_bad}
    for i in (i for i in range(60) if bad(i)):
        lines = [r for r in caplog.records if f"synthetic://image/{i}.bin" in r.getMessage()]
        assert len(lines) <= 1  # once per sample, however often it comes round
    assert sum(1 for r in caplog.records if "synthetic://image/" in r.getMessage()) == len(
        {i for _, i in read.tolist() if bad(i)})


def test_a_mostly_broken_source_raises_a_clear_error_instead_of_training_on_nothing():
    specs = _specs(fail=lambda i: i % 2 == 0, modalities=("audio",))
    with _loader(specs, prefetch=2, bad_window=40) as loader, pytest.raises(TooManyBadSamples) as err:
        for _ in range(50):
            loader.next_microbatch("audio")
    message = str(err.value)
    assert "audio" in message and "synthetic://audio/" in message and "max_bad_fraction" in message


def test_samples_longer_than_a_row_are_skipped_with_a_reason():
    specs = _specs(modalities=("image", "text"))
    with _loader(specs, seq_length=200, max_bad_fraction=1.0) as loader:
        for _ in range(5):
            assert loader.next_microbatch("image").tokens.shape == (2, 200)
            loader.next_microbatch("text")  # text is truncated, never skipped
        reasons = loader.skipped_by_reason()
    assert reasons.get("image/too_long", 0) > 0 and not any(k.startswith("text/") for k in reasons)


# ------------------------------------------------------------------------- validation
@pytest.mark.parametrize("pack", [True, False])
def test_validation_is_the_held_out_set_packed_like_training(pack):
    specs = _specs(validation_size=10, modalities=("audio",))
    index = _index(specs)
    order = SampleOrder([60], [1.0], seed=7, modality="audio", validation_size=10)
    held_out = {("audio", i) for _, i in order.validation_keys()}
    with _loader(specs, pack=pack) as loader:
        batches = loader.validation_microbatches("audio")
        assert loader.validation_microbatches("audio") is batches  # built once
        val_keys = [k for mb in batches for k in _sample_keys(mb, index)]
        train_keys = {k for _ in range(40) for k in _sample_keys(loader.next_microbatch("audio"), index)}
    assert sorted(val_keys) == sorted(held_out)
    assert not train_keys & held_out
    if pack:
        assert all(mb.tokens.shape == (2, S) for mb in batches)


# ------------------------------------------------------------------------- padding
def test_packed_padding_is_under_two_percent_on_the_realistic_mix():
    """The synthetic mix of `megatron_omni.data.synthetic` (M2-omni pre-training lengths) in
    4096-token rows with the default 256-sample look-ahead; pad-to-longest as the contrast."""
    specs = {m: ModalitySpec([SyntheticSource(m, 1500, vocab=VOCAB, seq_length=4096)]) for m in MODALITIES}
    packed = OmniLoader(specs, LoaderConfig(seq_length=4096, micro_batch_size=2, prefetch=0))
    padded = OmniLoader(specs, LoaderConfig(seq_length=4096, micro_batch_size=8, pack=False, prefetch=0))
    for m in MODALITIES:
        for _ in range(12):
            packed.next_microbatch(m)
            padded.next_microbatch(m)
        assert packed.padding_fraction(m) <= 0.02, m
    assert packed.padding_fraction() <= 0.02
    assert padded.padding_fraction() > 0.25
