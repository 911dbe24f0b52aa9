"""The tiny omni model in bf16 and fp16 through the real training stack (Float16Module, fp32 main
parameters, fp16's loss scaler) == fp32 within the stated tolerances, every modality at 1 rank
(NaViT images + videos, Whisper audio, speech generation, text); an fp16 overflow is a skipped
step, not a crash."""

from __future__ import annotations

import math

from tests.training.precision_helpers import assert_matches_fp32, run_precisions

CONFIG = "configs/tiny/omni_mock.yaml"
ONE_PER_MODALITY = ["train.global_batch_size=5", "optimizer.lr_warmup_steps=0"]


def test_bf16_and_fp16_match_fp32_every_modality(tmp_path):
    # fp16 starts at a loss scale that fits the per-token-sum gradients of this model (see below)
    results = run_precisions(1, tmp_path / "p.pt", CONFIG, [*ONE_PER_MODALITY, "optimizer.initial_loss_scale=16"],
                             precisions=("fp32", "bf16", "fp16"))
    assert set(results["fp32"]["rows"][0]["losses"]) == {"text", "image", "video", "audio", "audio_gen"}
    diffs = assert_matches_fp32(results, "bf16")
    assert {"vision.patch_embed", "vision.merger", "audio.conv1", "audio.decoder", "audio.connector",
            "decoder.layers", "output_layer.weight"} <= set(diffs)
    assert_matches_fp32(results, "fp16")
    assert results["fp16"]["loss_scale"] == 16.0


def test_fp16_overflow_skips_the_step_and_backs_off(tmp_path):
    """Megatron's default initial loss scale 2^32 overflows fp16 gradients: the dynamic scaler
    skips those steps (hysteresis 2: the second overflow halves the scale), the run goes on."""
    results = run_precisions(1, tmp_path / "p.pt", CONFIG, ONE_PER_MODALITY, precisions=("fp16",))
    rows = results["fp16"]["rows"]
    assert [r["update_successful"] for r in rows] == [False, False]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert results["fp16"]["loss_scale"] == 2.0 ** 31
