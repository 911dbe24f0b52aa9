"""Real faults injected into real multi-process runs (training/fault_injection.py): a rank killed
while the checkpoint is written, a rank killed mid-step, a full disk during a save."""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.helpers.launch import metrics, train

TP2 = ["parallel.tp=2", "train.save_interval=1"]


def _run(nproc, out, overrides, cache, fault):
    return train(nproc, out, overrides, cache_dir=cache, check=False,
                 env={"MEGATRON_OMNI_INJECT_FAULT": fault})


def test_rank_killed_during_a_checkpoint_write_resumes_as_if_nothing_happened(tmp_path, data_cache):
    reference = tmp_path / "reference"
    train(2, reference, TP2 + ["train.steps=4"], cache_dir=data_cache)
    out = tmp_path / "crashed"
    proc = _run(2, out, TP2 + ["train.steps=4"], data_cache, "kill@save:3:r1")
    assert proc.returncode != 0
    ckpts = out / "checkpoints"
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text().strip() == "2"  # step 3 never committed
    assert (ckpts / "iter_0000003").is_dir()  # its shards are there, its manifest is not
    resumed = train(2, out, TP2 + ["train.steps=4", f"train.load={ckpts}"], cache_dir=data_cache)
    assert "loaded" in resumed.stdout + resumed.stderr
    assert "ignoring iter_ folder(s) of steps [3] past the tracker's step 2" in resumed.stdout + resumed.stderr
    ref, got = metrics(reference), metrics(out)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(ref, got):
        assert b["loss"] == a["loss"] and b["grad_norm"] == a["grad_norm"], b["step"]  # bit-identical


def test_a_rank_killed_mid_step_ends_the_job_quickly_with_a_nonzero_code(tmp_path, data_cache):
    """Also (same run, TP2 x DP2, text): a loss spike forced at step 2 on DP rank 1 is logged with
    the step's samples, which megatron's sampler order fixes (data/sampler.py): DP rank r's micro
    step k reads consumed + k*mbs*dp + r*mbs + [0, mbs)."""
    start = time.time()
    proc = _run(4, tmp_path, ["parallel.tp=2", "train.steps=50", "train.loss_spike_factor=5",
                              "train.loss_spike_window=1"], data_cache, "kill@step:3:r2,spike@step:2:r1")
    elapsed = time.time() - start
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "fault injection: kill at step of step 3 on rank 2" in log
    assert "rank      : 2" in log and "Signal 9 (SIGKILL)" in log, log[-3000:]  # torchrun names the dead rank
    rows = metrics(tmp_path)
    assert len(rows) == 2
    (spike,) = [json.loads(line) for line in (tmp_path / "loss_spikes.jsonl").read_text().splitlines()]
    assert spike["step"] == 2 and spike["loss"] == rows[1]["loss"] and spike["reference"] == rows[0]["loss"]
    mbs, dp, consumed = 2, 2, 8  # TINY: micro_batch_size 2, global_batch_size 8
    logged = {(mb["dp_rank"], mb["microbatch"]): [int(re.match(r"train sample (\d+) \(", i)[1]) for i in mb["samples"]]
              for mb in spike["microbatches"]}
    assert logged == {(r, k): [consumed + k * mbs * dp + r * mbs + j for j in range(mbs)]
                      for r in range(dp) for k in range(2)}
    assert all("corpus-" in i and "documents [" in i for mb in spike["microbatches"] for i in mb["samples"])
    worst = max(spike["microbatches"], key=lambda mb: mb["loss"])
    assert (worst["dp_rank"], worst["microbatch"]) == (1, 0) and "loss spike" in log
    # survivors did not wait for parallel.distributed_timeout_minutes (10): torchrun tore them down
    assert elapsed < 120, elapsed


def test_a_full_disk_during_a_save_is_one_error_and_the_previous_checkpoint_stays(tmp_path, data_cache):
    # keep_last_checkpoints=1: pruning before the new checkpoint is complete would lose step 1 too
    proc = _run(1, tmp_path, ["train.steps=4", "train.save_interval=1", "train.keep_last_checkpoints=1"],
                data_cache, "enospc@save:2")
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "disk full while writing checkpoint" in log and "previous checkpoint (step 1) stays in force" in log
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert not (ckpts / "iter_0000002").exists()
    again = train(1, tmp_path, ["train.steps=2", f"train.load={ckpts}"], cache_dir=data_cache)
    assert metrics(tmp_path)[-1]["step"] == 2 and again.returncode == 0


@pytest.mark.parametrize("spec", ["kill@nowhere:3", "boom@step:3", "kill@step:x", "kill@step:3:r1:r2", "spike@save:3"])
def test_a_bad_injection_spec_is_refused(spec):
    from megatron_omni.training.fault_injection import parse_faults

    with pytest.raises(ValueError, match="KIND@POINT:STEP"):
        parse_faults(spec)
