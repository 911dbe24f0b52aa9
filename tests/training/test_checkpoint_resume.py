"""Checkpoints: exact resume, reshard on load (TP2xPP2 <-> TP1xPP1), SIGTERM saves and exits.

All runs share one 6-step schedule (LR warmup/decay depend on train.steps), so a run
interrupted at step 3 and resumed must reproduce the uninterrupted run's steps 4-6.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.launch import REPO, TINY, metrics, train

STEPS = 6
SCHEDULE = [f"train.steps={STEPS}"]
TP2_PP2 = ["parallel.tp=2", "parallel.pp=2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("uninterrupted")
    train(1, out, SCHEDULE, cache_dir=data_cache)
    return {r["step"]: r for r in metrics(out)}


@pytest.fixture(scope="module")
def stopped_tp1(tmp_path_factory, data_cache):
    """Single-rank run that stops after step 3 with a checkpoint (train.exit_interval)."""
    out = tmp_path_factory.mktemp("stopped_tp1")
    train(1, out, SCHEDULE + ["train.exit_interval=3"], cache_dir=data_cache)
    return out


def _resume(out, load_from, nproc, layout, data_cache):
    train(nproc, out, SCHEDULE + layout + [f"train.load={load_from / 'checkpoints'}"], cache_dir=data_cache)
    return {r["step"]: r for r in metrics(out)}


def test_exit_interval_writes_checkpoint(stopped_tp1):
    rows = metrics(stopped_tp1)
    assert [r["step"] for r in rows] == [1, 2, 3]
    ckpts = stopped_tp1 / "checkpoints"
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert (ckpts / "iter_0000003" / "metadata.json").is_file()


def test_resume_is_bit_identical(stopped_tp1, reference, tmp_path, data_cache):
    resumed = _resume(tmp_path, stopped_tp1, 1, [], data_cache)
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step]["loss"] == reference[step]["loss"], step  # fp32 CPU: bitwise
        assert resumed[step]["grad_norm"] == reference[step]["grad_norm"], step
        assert resumed[step]["lr"] == reference[step]["lr"], step
        assert resumed[step]["consumed_samples"] == reference[step]["consumed_samples"]


@pytest.mark.slow  # the other direction (TP2xPP2 -> TP1) runs in CI, as does TP1xDP2 -> TP2 (faults/test_layout_resume)
def test_tp1_checkpoint_loads_at_tp2_pp2(stopped_tp1, reference, tmp_path, data_cache):
    resumed = _resume(tmp_path, stopped_tp1, 4, TP2_PP2, data_cache)
    for step in (4, 5, 6):
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5), step
        assert resumed[step]["grad_norm"] == pytest.approx(reference[step]["grad_norm"], rel=1e-5), step


def test_tp2_pp2_checkpoint_loads_at_tp1(reference, tmp_path, data_cache):
    stopped = tmp_path / "stopped_tp2pp2"
    train(4, stopped, SCHEDULE + TP2_PP2 + ["train.exit_interval=3"], cache_dir=data_cache)
    for step, row in {r["step"]: r for r in metrics(stopped)}.items():
        assert row["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5)
    resumed = _resume(tmp_path / "resumed", stopped, 1, [], data_cache)
    for step in (4, 5, 6):
        # Optimizer moments, LR schedule and data position all crossed the layout change.
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5), step
        assert resumed[step]["grad_norm"] == pytest.approx(reference[step]["grad_norm"], rel=1e-5), step


def test_sigterm_checkpoints_and_exits(tmp_path, data_cache):
    """SLURM preemption: SIGTERM to the launcher -> every rank finishes its step, saves, exits."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "megatron_omni.train", "--config", "configs/tiny/llm.yaml", *TINY, "parallel.tp=2",
           "train.steps=100000", f"data.cache_dir={data_cache}", f"train.output_dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics_file = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    last = metrics(tmp_path)[-1]["step"]
    assert 2 <= last < 100000
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text().strip() == str(last), out[-3000:]
    assert (ckpts / f"iter_{last:07d}" / "metadata.json").is_file()
    assert "exiting after step" in out and "SIGTERM" in out, out[-3000:]
