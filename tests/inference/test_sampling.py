"""Token choice and prompt batching of megatron_omni.inference, one process, no model: top-k / top-p
filtering against a direct transcription of their definitions, the log-prob definition, seeded
reproducibility, left padding + masks, and the errors bad prompts raise."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_omni.inference.prompts import build_prompt_batch, decode_attention_mask, prefill_attention_mask
from megatron_omni.inference.sampling import SamplingParams, filter_top_k_top_p, sample_next


def _reference_keep(row, top_k, top_p):
    """Kept token ids of one row, from the definitions: the k largest; then the smallest prefix of
    the probability-sorted tokens whose mass reaches top_p."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    keep = order[:top_k] if top_k else order
    if top_p < 1.0:
        z = sum(math.exp(row[i]) for i in keep)
        mass, nucleus = 0.0, []
        for i in keep:
            nucleus.append(i)
            mass += math.exp(row[i]) / z
            if mass >= top_p:
                break
        keep = nucleus
    return set(keep)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.7), (8, 0.5), (1, 0.9), (0, 1e-6)])
def test_top_k_top_p_match_definition(top_k, top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=g, dtype=torch.float64) * 2
    out = filter_top_k_top_p(logits, top_k, top_p)
    for b in range(logits.shape[0]):
        kept = set(torch.nonzero(torch.isfinite(out[b])).flatten().tolist())
        assert kept == _reference_keep(logits[b].tolist(), top_k, top_p)
        assert torch.equal(out[b][list(kept)], logits[b][list(kept)])


def test_logprob_is_full_vocab_log_softmax_at_temperature_and_sampling_is_seeded():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 50, generator=g)
    params = SamplingParams(temperature=0.7, top_k=10, top_p=0.8, seed=3)
    draws = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(params.seed)
        draws.append(sample_next(logits, params, gen))
    (tok, lp), (tok2, lp2) = draws
    assert torch.equal(tok, tok2) and torch.equal(lp, lp2)
    ref = torch.log_softmax(logits.double() / 0.7, -1).gather(-1, tok[:, None]).squeeze(-1)
    torch.testing.assert_close(lp.double(), ref, atol=1e-6, rtol=0)
    allowed = torch.isfinite(filter_top_k_top_p(logits / 0.7, 10, 0.8))
    assert allowed.gather(-1, tok[:, None]).all()  # only nucleus tokens are drawn
    padded = torch.cat([logits, torch.zeros(4, 14)], -1)  # the model's output incl. TP padding rows
    tok3, lp3 = sample_next(logits, params, torch.Generator().manual_seed(params.seed), padded)
    assert torch.equal(tok3, tok)
    torch.testing.assert_close(lp3.double(), torch.log_softmax(padded.double() / 0.7, -1).gather(
        -1, tok[:, None]).squeeze(-1), atol=1e-6, rtol=0)
    greedy_tok, greedy_lp = sample_next(logits, SamplingParams(greedy=True), None)
    assert torch.equal(greedy_tok, logits.argmax(-1))
    torch.testing.assert_close(greedy_lp, torch.log_softmax(logits, -1).max(-1).values)


def test_left_padding_and_masks():
    batch = build_prompt_batch([[5, 6, 7], [8], [1, 2, 3, 4]], None, vocab_size=10, pad_id=0)
    assert batch.tokens.tolist() == [[0, 5, 6, 7], [0, 0, 0, 8], [1, 2, 3, 4]]
    assert batch.lengths == [3, 1, 4] and batch.position_ids is None
    m = prefill_attention_mask(batch.valid)  # True = masked
    assert m.shape == (3, 1, 4, 4)
    assert m[1, 0, 3].tolist() == [True, True, True, False]  # the one real token sees itself only
    assert m[0, 0, 2].tolist() == [True, False, False, True]  # causal + padding
    d = decode_attention_mask(torch.cat([batch.valid, torch.ones(3, 1, dtype=torch.bool)], 1))
    assert d.shape == (3, 1, 1, 5) and d[1, 0, 0].tolist() == [True, True, True, False, False]


@pytest.mark.parametrize("prompts,media,match", [
    ([[1, 2], []], None, "prompt 1 is empty"),
    ([[1, 12]], None, r"prompt 0 has token ids in \[1, 12\] outside the model vocabulary \[0, 10\)"),
    ([[1]], [None, None], "2 media entries for 1 prompts"),
    ([[1]], [object()], "media given but the model is a plain Llama"),
])
def test_bad_prompts_raise_one_clear_error(prompts, media, match):
    with pytest.raises(ValueError, match=match):
        build_prompt_batch(prompts, media, vocab_size=10, pad_id=0)


def test_bad_sampling_params():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SamplingParams(temperature=0.0)
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        SamplingParams(max_new_tokens=0)
    assert SamplingParams(stop_ids=[128009, 128001]).padding_id == 128009
