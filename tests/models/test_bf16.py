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


# ------------------------------------------------------------------ audio encoders under Float16Module

import pytest  # noqa: E402

from megatron_omni.convert.mcore_io import megatron_world  # noqa: E402
from megatron_omni.models.audio import AudioConfig, build_audio_encoder  # noqa: E402

AUDIO = {
    "whisper": dict(encoder_type="whisper", num_mel_bins=16, d_model=32, num_layers=2, num_attention_heads=4,
                    ffn_hidden_size=64, max_source_positions=40, downsample_factor=2, out_hidden_size=48),
    "sanm": dict(encoder_type="sanm", num_mel_bins=8, d_model=32, num_layers=2, num_attention_heads=4,
                 ffn_hidden_size=64, max_source_positions=40, lfr_m=7, lfr_n=6, sanm_kernel_size=5,
                 downsample_factor=2, out_hidden_size=48),
}


@pytest.mark.parametrize("kind", sorted(AUDIO))
def test_audio_encoder_casts_fp32_features_to_its_dtype(kind):
    """Float16Module casts the encoder to bf16 but media keywords arrive fp32: the encoder casts its
    input (a bf16 conv/linear on an fp32 fbank raises "Input type (float) and bias type (BFloat16)"),
    and its output is the fp32 encoder's within bf16 precision.  SAN-M's CMVN statistics stay fp32."""
    cfg = AudioConfig(**AUDIO[kind])
    with megatron_world():
        torch.manual_seed(0)
        ref = build_audio_encoder(cfg).eval()
        if kind == "sanm":
            with torch.no_grad():  # FunASR-like statistics: a bf16 copy would round them
                ref.cmvn.shift.copy_(-8.3 - torch.rand(ref.cmvn.shift.shape))
                ref.cmvn.scale.copy_(0.2 + 0.1 * torch.rand(ref.cmvn.scale.shape))
        half = build_audio_encoder(cfg).eval()
        half.load_state_dict(ref.state_dict())
        half.bfloat16()  # what megatron's Float16Module does to every submodule
        feats = torch.randn(2, cfg.num_mel_bins, 30) + (8.5 if kind == "sanm" else 0.0)
        lengths = torch.tensor([30, 17])
        with torch.no_grad():
            want, want_len = ref(feats, lengths)
            got, got_len = half(feats, lengths)
    assert got.dtype == torch.bfloat16 and torch.equal(got_len, want_len)
    assert torch.isfinite(got).all()
    rel = ((got.float() - want).norm() / want.norm()).item()
    assert rel < 2e-2, rel
    if kind == "sanm":
        assert half.cmvn.shift.dtype == half.cmvn.scale.dtype == torch.float32
        assert torch.equal(half.cmvn.shift, ref.cmvn.shift) and torch.equal(half.cmvn.scale, ref.cmvn.scale)
