"""bf16 == fp32 (stated tolerances, tests/training/precision_helpers.py) for the model variants
the main precision test does not build: the SAN-M audio encoder with the MoE backbone (shared +
routed + null experts), and alignment tuning (DPO + 0.3 x instruction losses, LoRA adapters,
reference pass with the adapters off) on mock preference pairs."""

from __future__ import annotations

import math

import pytest

from tests.training.precision_helpers import assert_matches_fp32, run_precisions

SANM = ("omni.audio={encoder_type: sanm, num_mel_bins: 80, d_model: 32, num_layers: 2, num_attention_heads: 4, "
        "ffn_hidden_size: 64, max_source_positions: 40, lfr_m: 7, lfr_n: 6, sanm_kernel_size: 5, "
        "downsample_factor: 3, out_hidden_size: 64}")


def test_bf16_sanm_audio_and_moe_backbone(tmp_path):
    results = run_precisions(1, tmp_path / "p.pt", "configs/tiny/omni_mock.yaml",
                             ["train.global_batch_size=5", "optimizer.lr_warmup_steps=0",
                              "model=configs/model/tiny_moe_llm.yaml", SANM])
    diffs = assert_matches_fp32(results, "bf16")
    grads = results["bf16"]["grads"]
    assert any(".mlp.experts." in n for n in grads) and any(".mlp.shared_experts." in n for n in grads)
    assert any(n.startswith("audio.layers.") and "fsmn" in n for n in grads), [n for n in grads if "audio" in n][:8]
    assert "audio.connector" in diffs


def test_bf16_alignment_tuning_dpo_lora(tmp_path):
    results = run_precisions(1, tmp_path / "p.pt", "configs/tiny/stages/at.yaml",
                             ["data.mock=true", "train.global_batch_size=6", "optimizer.lr_warmup_steps=0",
                              "train.pretrained_checkpoint=null", "train.load=null"])
    assert_matches_fp32(results, "bf16")
    for precision in ("fp32", "bf16"):
        rows, grads = results[precision]["rows"], results[precision]["grads"]
        assert set(rows[0]["losses"]) == {"text", "image", "video", "audio", "audio_gen", "preference"}
        assert grads and all(".lora." in n for n in grads)  # only the adapters train
        # B = 0: the policy is the reference, bit for bit, in bf16 too
        assert rows[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert rows[1]["dpo_loss"] != pytest.approx(math.log(2), abs=1e-7)
