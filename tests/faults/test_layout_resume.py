"""An omni run resumed at another layout (TP1 x DP2 -> TP2 x DP1) keeps its data position, the
modality-round scheduler and the adaptive balancer (Sec. 3.2): the weights the resumed run trains
with equal those of the uninterrupted run, and the log says the position was re-split."""

from __future__ import annotations

import pytest

from tests.helpers.launch import metrics, train

CONFIG = "configs/tiny/omni_mock.yaml"
BALANCE = ("balance={mode: accumulation, modalities: [image, video, audio, audio_gen, text], "
           "pure_text_share: 0.25, adaptive: {enabled: true, window: 2}}")
COMMON = ["data.seq_length=96", "train.micro_batch_size=1", "train.global_batch_size=16", "train.steps=4",
          "train.save_interval=2", "optimizer.lr_warmup_steps=1", "train.eval_interval=1", BALANCE]


def test_dp2_run_resumes_at_tp2_dp1_with_its_balancer_state(tmp_path):
    cache = tmp_path / "cache"
    full = tmp_path / "full"
    train(2, full, COMMON, cache_dir=cache, config=CONFIG)
    stopped = tmp_path / "stopped"
    train(2, stopped, COMMON + ["train.exit_interval=2"], cache_dir=cache, config=CONFIG)
    proc = train(2, stopped, COMMON + ["parallel.tp=2", f"train.load={stopped / 'checkpoints'}"], cache_dir=cache,
          config=CONFIG)
    rows, again = metrics(full), metrics(stopped)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    # Steps 1-2 fill the balancer's window (H=2) and step 4 is the first whose weights move (Eq. 8-11).
    # Had the balancer state been dropped at the layout change, step 4 would still train at 1.0.
    # It moves as in the uninterrupted run, up to the different step-3 microbatches (mock data is drawn
    # per DP rank, so DP1 sees other samples than DP2 at step 3).
    ones = pytest.approx({m: 1.0 for m in rows[0]["modality_weights"]})
    assert rows[2]["modality_weights"] == ones and again[2]["modality_weights"] == ones
    assert rows[3]["modality_weights"] != ones and again[3]["modality_weights"] != ones
    assert again[3]["modality_weights"] == pytest.approx(rows[3]["modality_weights"], rel=1e-2)
    assert "data position re-split from 2 DP ranks" in proc.stdout + proc.stderr
