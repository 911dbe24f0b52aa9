"""A crash after the last checkpoint leaves rows of steps the resumed run trains again: after the
restart metrics.jsonl, loss_spikes.jsonl and TensorBoard hold every step once, and the resumed
losses equal the first attempt's (training/metrics.py)."""

from __future__ import annotations

import json
import shutil

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers.launch import train


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_metrics_and_tensorboard_hold_each_step_once_after_a_crash(tmp_path, data_cache):
    out = tmp_path / "run"
    train(1, out, ["train.steps=3", "train.save_interval=2"], cache_dir=data_cache)
    first = {r["step"]: r["loss"] for r in _rows(out)}
    # the crash: step 3 was logged but its checkpoint never completed
    ckpts = out / "checkpoints"
    shutil.rmtree(ckpts / "iter_0000003")
    (ckpts / "latest_checkpointed_iteration.txt").write_text("2")
    (out / "loss_spikes.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 3, "loss": 9.0}\n')  # step 3: dropped
    train(1, out, ["train.steps=4", "train.save_interval=2", f"train.load={ckpts}"], cache_dir=data_cache)
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["loss"] == pytest.approx(first[3], rel=1e-6)  # step 3 trained again, same loss
    assert [json.loads(line)["step"] for line in (out / "loss_spikes.jsonl").read_text().splitlines()] == [1]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
