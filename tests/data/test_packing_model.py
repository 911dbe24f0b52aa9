"""A packed microbatch through the tiny Llama (megatron GPTModel, 1-rank world) gives every sample
the same per-token losses as running that sample alone: cu_seqlens, the block-diagonal mask built
from it and the packed labels/loss_mask are what the model's packed path needs."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_omni.config.loader import load_section_file
from megatron_omni.config.schema import ModelConfig, ParallelConfig
from megatron_omni.data.packing import PackingBuffer, collate_rows, fit_to_length, packed_attention_mask
from megatron_omni.data.synthetic import SyntheticSource
from megatron_omni.models.omni_vocab import OmniVocab

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = OmniVocab(text_vocab_size=1900, audio_codebook_size=64)  # fits the tiny model's 2000 ids


@pytest.fixture(scope="module")
def tiny_llama():
    from megatron_omni.convert.mcore_io import megatron_world
    from megatron_omni.models.init import init_weights_layout_invariant
    from megatron_omni.models.llama import build_llama_chunks

    cfg = load_section_file(ModelConfig, os.path.join(REPO, "configs/model/tiny_llm.yaml"))
    cfg.transformer_impl = "local"
    assert VOCAB.size <= cfg.vocab_size
    with megatron_world():
        (model,) = build_llama_chunks(cfg, ParallelConfig(), seq_length=512, params_dtype=torch.float32)
        init_weights_layout_invariant([model], cfg, seed=0)
        yield model.eval()


def _token_losses(model, mb) -> torch.Tensor:
    B, S = mb.tokens.shape
    mask = packed_attention_mask(mb.cu_seqlens, B, S)
    with torch.no_grad():
        return model(mb.tokens, mb.position_ids[0], mask, labels=mb.labels)  # [B, S]


def test_packed_rows_give_each_sample_its_unpacked_losses(tiny_llama):
    S = 512
    samples = [fit_to_length(s, S)[0] for s in SyntheticSource("image", 12, vocab=VOCAB, seq_length=S, seed=2).samples(range(12))]
    buffer = PackingBuffer(S, capacity=len(samples))
    for i, s in enumerate(samples):
        buffer.add(i, s)
    rows = [buffer.next_row() for _ in range(2)]
    assert sum(len(r) for r in rows) >= 4, "several samples per row"
    packed = _token_losses(tiny_llama, collate_rows(rows, S))
    worst = 0.0
    for r, row in enumerate(rows):
        offset = 0
        for sample in row:
            n = len(sample)
            alone = _token_losses(tiny_llama, collate_rows([[sample]], n))[0]
            mask = sample.loss_mask.bool()
            assert mask.any()
            worst = max(worst, (packed[r, offset:offset + n][mask] - alone[mask]).abs().max().item())
            offset += n
    print(f"\npacked vs alone: max |delta loss| {worst:.2e}")
    assert worst < 1e-4
    # Without the block-diagonal mask the later samples of a row see their neighbours.
    mb = collate_rows(rows, S)
    causal = torch.ones(S, S, dtype=torch.bool).tril().logical_not().expand(2, 1, S, S)
    with torch.no_grad():
        leaky = tiny_llama(mb.tokens, mb.position_ids[0], causal, labels=mb.labels)
    assert (leaky - packed)[mb.loss_mask.bool()].abs().max().item() > 1e-3
