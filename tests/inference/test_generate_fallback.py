"""generate() in one process: the equal-length-groups fallback (taken where the attention kernels
ignore an explicit padding mask: TE, fused softmax) gives what the left-padded batch gives, and the
caller's training mode survives generation (the RL stage generates between optimizer steps)."""

import dataclasses
from pathlib import Path

import torch

import megatron_omni.inference.generate as gen
from megatron_omni.config import ParallelConfig
from megatron_omni.config.loader import load_section_file
from megatron_omni.config.schema import ModelConfig

REPO = Path(__file__).resolve().parents[2]


def test_equal_length_groups_equal_the_padded_batch(monkeypatch):
    from megatron_omni.convert.mcore_io import megatron_world
    from megatron_omni.models.init import init_weights_layout_invariant
    from megatron_omni.models.llama import build_llama_chunks

    with megatron_world():
        llm = load_section_file(ModelConfig, str(REPO / "configs/model/tiny_llm.yaml"))
        chunks = build_llama_chunks(llm, ParallelConfig(), seq_length=32, params_dtype=torch.float32)
        init_weights_layout_invariant(chunks, llm, seed=3)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, llm.vocab_size, (n,), generator=g).tolist() for n in (5, 9, 5, 3)]
        params = gen.SamplingParams(max_new_tokens=6, greedy=True)
        chunks[0].train()
        padded = gen.generate(chunks, prompts, params)
        assert chunks[0].training  # the caller's mode is restored
        monkeypatch.setattr(gen, "_padding_mask_honoured", lambda chunks: False)
        grouped = gen.generate(chunks, prompts, params)  # lengths 5, 9, 3 -> three groups
        sampled = gen.generate(chunks, prompts, dataclasses.replace(params, greedy=False, temperature=0.9, seed=4))
    assert padded.tokens.shape == grouped.tokens.shape == (4, 6)
    assert torch.equal(grouped.tokens, padded.tokens)
    torch.testing.assert_close(grouped.logprobs, padded.logprobs, atol=1e-5, rtol=0)
    assert sampled.lengths.tolist() == [6] * 4 and (sampled.logprobs <= 0).all()
