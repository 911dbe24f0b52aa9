"""bf16 at TP2 x PP2 (uneven first stage, sequence parallelism, recomputed encoders) == fp32 at the
same layout within the stated bf16 tolerances (tests/training/precision_helpers.py); the fp32 run
itself equals the single-rank run (tests/training/test_omni_training.py)."""

from __future__ import annotations

from tests.training.precision_helpers import assert_matches_fp32, run_precisions


def test_bf16_tp2_pp2_matches_fp32(tmp_path):
    results = run_precisions(4, tmp_path / "p.pt", "configs/tiny/omni_mock.yaml",
                             ["train.global_batch_size=5", "optimizer.lr_warmup_steps=0", "parallel.tp=2",
                              "parallel.pp=2", "parallel.first_stage_num_layers=1", "parallel.sequence_parallel=true",
                              "omni.vision.recompute=true", "omni.audio.recompute=true"])
    diffs = assert_matches_fp32(results, "bf16")
    assert {"vision.decoder", "audio.decoder", "embedding.word_embeddings", "decoder.layers"} <= set(diffs)
    assert set(results["bf16"]["rows"][0]["losses"]) == {"text", "image", "video", "audio", "audio_gen"}
