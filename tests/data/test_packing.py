"""Packing invariants on synthetic OmniSamples (random lengths and media of every modality)."""

from __future__ import annotations

import random
from collections import Counter
from typing import Dict, List, Tuple

import pytest
import torch

from megatron_omni.data.omni_batch import OmniMicrobatch, OmniSample
from megatron_omni.data.packing import (
    PackingBuffer,
    collate_rows,
    fit_to_length,
    media_bytes,
    packed_attention_mask,
    padding_fraction,
)
from megatron_omni.data.synthetic import MODALITIES, SyntheticSource
from megatron_omni.config.encoders import AudioConfig, audio_token_count
from megatron_omni.models.omni_vocab import OmniVocab

VOCAB = OmniVocab(text_vocab_size=2000, audio_codebook_size=64)
PAD = 0
MERGE = 2


def _content(sample_or_slices) -> Tuple:
    tokens, labels, loss_mask, pos = sample_or_slices
    return (tuple(tokens.tolist()), tuple(labels.tolist()), tuple(loss_mask.tolist()), tuple(pos.flatten().tolist()))


def _sample_content(s: OmniSample) -> Tuple:
    return _content((s.tokens, s.labels, s.loss_mask, s.position_ids))


def _segments(mb: OmniMicrobatch):
    """(row, start, end) of every cu_seqlens segment, row-local offsets."""
    B, S = mb.tokens.shape
    cu = mb.cu_seqlens.tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        row = a // S
        assert (b - 1) // S == row, f"segment [{a}, {b}) crosses a row boundary"
        yield row, a - row * S, b - row * S


def _runs(row: torch.Tensor, token: int) -> List[int]:
    """Lengths of the runs of `token` in a row, left to right."""
    runs, n = [], 0
    for t in row.tolist() + [None]:
        if t == token:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def _check_media_token_order(mb: OmniMicrobatch, expected: List[OmniSample]) -> None:
    """Media tensors = the packed samples' media in segment (token) order, and each placeholder
    run in the rows (row-major) matches its grid / audio length."""
    for pad_name, values, grids in (("<image_pad>", "pixel_values", "image_grid_thw"),
                                    ("<video_pad>", "pixel_values_videos", "video_grid_thw")):
        runs = [n for r in range(mb.tokens.shape[0]) for n in _runs(mb.tokens[r], VOCAB.id(pad_name))]
        parts = [getattr(s, values) for s in expected if getattr(s, values) is not None]
        if not parts:
            assert getattr(mb, values) is None and not runs
            continue
        grid = getattr(mb, grids)
        assert runs == (grid.prod(-1) // MERGE ** 2).tolist()
        assert getattr(mb, values).shape[0] == int(grid.prod(-1).sum())
        assert torch.equal(getattr(mb, values), torch.cat(parts))
        assert torch.equal(grid, torch.cat([getattr(s, grids) for s in expected if getattr(s, grids) is not None]))
    runs = [n for r in range(mb.tokens.shape[0]) for n in _runs(mb.tokens[r], VOCAB.audio_pad_id)]
    clips = [(s.audio_features[i], int(s.audio_lengths[i])) for s in expected if s.audio_features is not None
             for i in range(s.audio_features.shape[0])]
    if not clips:
        assert mb.audio_features is None and not runs
        return
    assert runs == [audio_token_count(n, AudioConfig()) for _, n in clips]
    assert mb.audio_lengths.tolist() == [n for _, n in clips]
    assert mb.audio_features.shape[1] == max(n for _, n in clips)
    for k, (feats, n) in enumerate(clips):
        assert torch.equal(mb.audio_features[k, :n], feats[:n])
        assert not mb.audio_features[k, n:].any()


def check_microbatch(mb: OmniMicrobatch, rows: List[List[OmniSample]], seq_length: int) -> None:
    B, S = mb.tokens.shape
    assert (B, S) == (len(rows), seq_length)
    by_content: Dict[Tuple, OmniSample] = {_sample_content(s): s for row in rows for s in row}
    ordered = []
    for r, start, end in _segments(mb):
        sl = slice(start, end)
        if bool((mb.loss_mask[r, sl] == 0).all()) and bool((mb.tokens[r, sl] == PAD).all()):
            # a padding tail: the row's last segment, everything zero / pad
            assert end == S and not mb.labels[r, sl].any() and not mb.position_ids[:, r, sl].any()
            continue
        content = _content((mb.tokens[r, sl], mb.labels[r, sl], mb.loss_mask[r, sl], mb.position_ids[:, r, sl]))
        assert content in by_content, f"row {r} [{start}, {end}) is not one whole sample"
        assert int(mb.position_ids[0, r, start]) == 0, "positions restart in every packed sample"
        ordered.append(by_content[content])
    assert Counter(id(s) for s in ordered) == Counter(id(s) for row in rows for s in row)
    _check_media_token_order(mb, ordered)


@pytest.fixture(scope="module")
def mixed_samples() -> List[OmniSample]:
    rng = random.Random(0)
    sources = {m: SyntheticSource(m, 10_000, vocab=VOCAB, seed=1) for m in MODALITIES}
    picks = [rng.choice(MODALITIES) for _ in range(120)]
    return [sources[m][i] for i, m in enumerate(picks)]


def test_packed_microbatches_hold_every_sample_once_with_media_in_token_order(mixed_samples):
    S, B = 4096, 2
    fitting = [fit_to_length(s, S)[0] for s in mixed_samples]
    fitting = [s for s in fitting if s is not None]
    buffer = PackingBuffer(S, capacity=32)
    packed: List[OmniSample] = []
    it = iter(fitting)
    exhausted = False
    while not exhausted or len(buffer):
        while not buffer.full and not exhausted:
            nxt = next(it, None)
            exhausted = nxt is None
            if nxt is not None:
                buffer.add(len(packed) + len(buffer), nxt)
        rows = [buffer.next_row() for _ in range(B)]
        mb = collate_rows(rows, S, pad_token_id=PAD, modality="mixed")
        check_microbatch(mb, rows, S)
        packed += [s for row in rows for s in row]
    assert Counter(_sample_content(s) for s in packed) == Counter(_sample_content(s) for s in fitting)


def test_padding_tail_and_empty_rows_are_own_segments():
    src = SyntheticSource("image", 100, vocab=VOCAB)
    a, b = src[0], src[1]
    S = len(a) + len(b) + 7
    mb = collate_rows([[a, b], [], [b]], S, pad_token_id=PAD)
    assert mb.cu_seqlens.tolist() == [0, len(a), len(a) + len(b), S, 2 * S, 2 * S + len(b), 3 * S]
    assert mb.max_seqlen == S
    assert mb.modality == "image"
    check_microbatch(mb, [[a, b], [], [b]], S)
    full = collate_rows([[a, b]], len(a) + len(b))
    assert full.cu_seqlens.tolist() == [0, len(a), len(a) + len(b)]  # no empty tail segment


def test_row_overflow_is_an_error():
    src = SyntheticSource("text", 10, vocab=VOCAB)
    with pytest.raises(ValueError, match="overflows"):
        collate_rows([[src[0], src[1]]], len(src[0]))


def test_fit_to_length_truncates_text_only_and_rejects_long_media():
    text = SyntheticSource("text", 200, vocab=VOCAB)
    long_text = max((text[i] for i in range(200)), key=len)
    assert len(long_text) > 600
    cut, reason = fit_to_length(long_text, 600)
    assert reason is None and len(cut) == 600
    assert torch.equal(cut.tokens, long_text.tokens[:600]) and torch.equal(cut.labels, long_text.labels[:600])
    assert torch.equal(cut.position_ids, long_text.position_ids[:, :600])
    image = SyntheticSource("image", 10, vocab=VOCAB)[0]
    assert fit_to_length(image, len(image) - 1) == (None, "too_long")
    assert fit_to_length(image, len(image))[0] is image


def test_best_fit_never_starves_the_oldest_sample():
    """Every sample leaves the buffer within `capacity` rows of arriving, even tiny ones that
    best-fit alone would keep passing over."""
    src = SyntheticSource("text", 500, vocab=VOCAB)
    buffer = PackingBuffer(1024, capacity=16)
    arrived_at, row_no = {}, 0
    for i in range(500):
        s = fit_to_length(src[i], 1024)[0]
        buffer.add(i, s)
        arrived_at[id(s)] = row_no
        if buffer.full:
            for s in buffer.next_row():
                assert row_no - arrived_at[id(s)] <= 16
            row_no += 1


def test_buffer_is_full_at_its_media_byte_budget():
    src = SyntheticSource("image", 10, vocab=VOCAB, patch_dim=64)
    samples = [src[i] for i in range(10)]
    budget = media_bytes(samples[0]) + media_bytes(samples[1])
    buffer = PackingBuffer(4096, capacity=100, max_bytes=budget)
    n = 0
    while not buffer.full:
        buffer.add(n, samples[n])
        n += 1
    assert n == 2 and buffer.buffered_bytes == budget
    buffer.next_row()
    assert buffer.buffered_bytes == 0 and not buffer.full


def test_pad_to_longest_shape_and_segments():
    src = SyntheticSource("audio", 10, vocab=VOCAB)
    samples = [src[i] for i in range(4)]
    longest = max(map(len, samples))
    mb = collate_rows([[s] for s in samples], longest)
    assert mb.tokens.shape == (4, longest)
    check_microbatch(mb, [[s] for s in samples], longest)
    assert padding_fraction([[s] for s in samples], longest) == pytest.approx(
        1 - sum(map(len, samples)) / (4 * longest))


def test_packed_attention_mask_is_block_diagonal_causal():
    cu = torch.tensor([0, 2, 5, 6, 9, 12], dtype=torch.int32)  # rows of 6: [2, 3, 1 pad] [3, 3]
    mask = packed_attention_mask(cu, 2, 6)
    assert mask.shape == (2, 1, 6, 6)
    seg = torch.tensor([[0, 0, 1, 1, 1, 2], [3, 3, 3, 4, 4, 4]])
    for b in range(2):
        for q in range(6):
            for k in range(6):
                allowed = seg[b, q] == seg[b, k] and k <= q
                assert bool(mask[b, 0, q, k]) == (not allowed)
