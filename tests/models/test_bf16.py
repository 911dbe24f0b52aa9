"""bf16 of the omni model's M-RoPE (issue 18): Float16Module-style casts keep inv_freq fp32."""

import torch

from megatron_omni.models.rope import MRoPEEmbedding


def test_mrope_inv_freq_stays_fp32_under_bf16_cast():
    emb = MRoPEEmbedding(kv_channels=16, device="cpu")
    ref = emb.inv_freq.clone()
    pos = torch.arange(12).view(1, 1, -1).expand(3, 2, -1)
    expected = emb(pos, [2, 3, 3])
    emb.bfloat16()  # what megatron's Float16Module does to every submodule
    assert emb.inv_freq.dtype == torch.float32
    assert torch.equal(emb.inv_freq, ref)
    torch.testing.assert_close(emb(pos, [2, 3, 3]), expected, rtol=0, atol=0)
