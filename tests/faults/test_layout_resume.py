"""An omni run resumed at another layout (TP1 x DP2 -> TP2 x DP1) keeps its data position, the
modality-round scheduler and the adaptive balancer (Sec. 3.2): the weights the resumed run trains
with equal those of the uninterrupted run, and the log says the position was re-split.

The same runs force a loss spike at step 3 (`spike@step:3:rDP`, training/fault_injection.py):
loss_spikes.jsonl must name exactly the samples of step 3 on each DP rank, and the resumed run
must catch it with the spike window it restored from the checkpoint."""

from __future__ import annotations

import json
import statistics

import pytest

from megatron_omni.balance import ModalityRoundScheduler
from megatron_omni.config import load_config
from tests.helpers.launch import metrics, train

CONFIG = "configs/tiny/omni_mock.yaml"
BALANCE = ("balance={mode: accumulation, modalities: [image, video, audio, audio_gen, text], "
           "pure_text_share: 0.25, adaptive: {enabled: true, window: 2}}")
COMMON = ["data.seq_length=96", "train.micro_batch_size=1", "train.global_batch_size=16", "train.steps=4",
          "train.save_interval=2", "optimizer.lr_warmup_steps=1", "train.eval_interval=1", BALANCE,
          "train.loss_spike_factor=5", "train.loss_spike_window=2"]
SPIKE = 3


def _spikes(out):
    return [json.loads(line) for line in (out / "loss_spikes.jsonl").read_text().splitlines()]


def _mock_ids_of_step(step, dp_rank, dp_size):
    """The mock microbatches (data/mock_omni.py: the i-th of a modality per DP rank) that step
    `step` draws, from the scheduler's plan alone (a pure function of seed and step)."""
    cfg = load_config(CONFIG, COMMON)
    scheduler = ModalityRoundScheduler(cfg.balance, cfg.train.global_batch_size // dp_size, cfg.train.seed)
    drawn = {}
    for s in range(step):
        ids = []
        for m in scheduler.plan(s).microbatch_modalities:
            ids.append((m, [f"mock:{m}/dp{dp_rank}/{drawn.get(m, 0)}/row0"]))
            drawn[m] = drawn.get(m, 0) + 1
    return ids


def test_dp2_run_resumes_at_tp2_dp1_with_its_balancer_state(tmp_path):
    cache = tmp_path / "cache"
    full = tmp_path / "full"
    train(2, full, COMMON, cache_dir=cache, config=CONFIG, env={"MEGATRON_OMNI_INJECT_FAULT": f"spike@step:{SPIKE}:r1"})
    # The uninterrupted run's step-2 checkpoint is what a run stopped there would have written (the
    # spike comes later, at step 3); resumed at TP2 x DP1 in a run folder of its own.
    resumed_dir = tmp_path / "resumed"
    proc = train(2, resumed_dir, COMMON + ["parallel.tp=2", f"train.load={full / 'checkpoints' / 'iter_0000002'}"],
                 cache_dir=cache, config=CONFIG, env={"MEGATRON_OMNI_INJECT_FAULT": f"spike@step:{SPIKE}:r0"})
    rows = metrics(full)
    again = rows[:2] + metrics(resumed_dir)  # steps 1-2 are the checkpoint's
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

    # the spike of DP rank 1's first microbatch at step 3, and exactly the step's samples per DP rank
    (spike,) = _spikes(full)
    assert spike["step"] == SPIKE and spike["loss"] == rows[SPIKE - 1]["loss"]
    assert spike["reference"] == pytest.approx(statistics.median([rows[0]["loss"], rows[1]["loss"]]), rel=1e-12)
    for dp in (0, 1):
        logged = [(mb["modality"], mb["samples"]) for mb in spike["microbatches"] if mb["dp_rank"] == dp]
        assert logged == _mock_ids_of_step(SPIKE, dp, 2), dp
    worst = max(spike["microbatches"], key=lambda mb: mb["loss"])
    assert (worst["dp_rank"], worst["microbatch"]) == (1, 0)
    assert all(mb["loss"] < worst["loss"] / 100 for mb in spike["microbatches"] if mb is not worst)
    # the per-microbatch reports add up to the logged step loss (token-weighted)
    mbs = spike["microbatches"]
    assert sum(mb["loss"] * mb["tokens"] for mb in mbs) / sum(mb["tokens"] for mb in mbs) == \
        pytest.approx(spike["loss"], rel=1e-9)
    # resumed at TP2 x DP1: step 3 is compared with the window of steps 1-2 restored from the checkpoint
    (resumed,) = _spikes(resumed_dir)
    assert resumed["step"] == SPIKE
    assert resumed["reference"] == pytest.approx(statistics.median([again[0]["loss"], again[1]["loss"]]), rel=1e-12)
    assert [mb["dp_rank"] for mb in resumed["microbatches"]] == [0] * 16  # DP1: all 16 microbatches
    assert all(mb["samples"] == [f"mock:{mb['modality']}/dp0/{mb['samples'][0].split('/')[2]}/row0"]
               for mb in resumed["microbatches"])
