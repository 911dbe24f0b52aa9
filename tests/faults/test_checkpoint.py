"""Checkpoints that survive corruption, a pruning that keeps what matters, and runs that refuse to
overwrite another run (training/ckpt_integrity.py, training/checkpoint.py)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from megatron_omni.training.ckpt_integrity import MANIFEST, file_crc32, verify_files
from tests.helpers.launch import metrics, train
from tests.conftest import FAULT_STEPS


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _shard(ckpt):
    return sorted(p for p in os.listdir(ckpt) if p.endswith(".distcp"))[-1]


def test_every_checkpoint_file_has_a_checksum(four_checkpoints):
    ckpt = four_checkpoints / "checkpoints" / "iter_0000004"
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert manifest["step"] == 4
    files = sorted(p for p in os.listdir(ckpt) if p != MANIFEST)
    assert sorted(manifest["files"]) == files and "common.pt" in files
    for name in files:
        assert manifest["files"][name] == {"size": os.path.getsize(ckpt / name), "crc32": file_crc32(ckpt / name)}
    assert verify_files(str(ckpt), manifest) == []


def test_truncated_missing_and_changed_files_are_named(four_checkpoints, tmp_path):
    ckpt = _copy(four_checkpoints / "checkpoints" / "iter_0000004", tmp_path / "iter_0000004")
    manifest = json.loads((ckpt / MANIFEST).read_text())
    shard = _shard(ckpt)
    with open(ckpt / shard, "r+b") as f:  # same size, 4 KiB of random bytes
        f.seek(4096)
        f.write(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    os.truncate(ckpt / "common.pt", 100)
    os.remove(ckpt / ".metadata")
    problems = "\n".join(verify_files(str(ckpt), manifest))
    assert f"{ckpt / shard}: checksum mismatch" in problems
    assert f"{ckpt / 'common.pt'}: truncated" in problems
    assert f"{ckpt / '.metadata'}: missing" in problems


def test_corrupt_newest_checkpoints_fall_back_to_the_last_complete_one(four_checkpoints, tmp_path):
    """Same-size corruption of an optimizer/model shard used to load silently and train on NaNs;
    a truncated shard gave a bare EOFError.  Newest: 4 KiB overwritten; the one before: truncated."""
    out = _copy(four_checkpoints, tmp_path / "run")
    newest, before = out / "checkpoints" / "iter_0000004", out / "checkpoints" / "iter_0000003"
    with open(newest / _shard(newest), "r+b") as f:
        f.seek(8192)
        f.write(b"\xff" * 4096)
    os.truncate(before / _shard(before), os.path.getsize(before / _shard(before)) // 2)  # a cut-off copy
    # resume and train 2 more steps; the lr is changed: the config's schedule must run (and be said)
    proc = train(1, out, FAULT_STEPS[:1] + ["train.steps=6", f"train.load={out / 'checkpoints'}",
                                             "optimizer.lr=1.0e-3"], cache_dir=tmp_path / "cache")
    log = proc.stdout + proc.stderr
    assert f"{newest / _shard(newest)}: checksum mismatch" in log and f"{before / _shard(before)}: truncated" in log
    assert "loaded the previous complete checkpoint" in log and "iter_0000002 instead" in log
    assert "LR schedule after resume: the config's (lr 0.001" in log and "optimizer.lr: checkpoint 0.003" in log
    rows = {r["step"]: r for r in metrics(out)}
    assert rows[3]["consumed_samples"] == 24  # steps 3 and 4 trained again from step 2
    # the config's schedule, computed by megatron's scheduler for the resumed step 4 (warmup 1,
    # cosine to min_lr 3e-4 over train.steps=6)
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    class _Opt:
        param_groups = [{"lr": 0.0, "weight_decay": 0.1}]
    sched = OptimizerParamScheduler(_Opt(), init_lr=0.0, max_lr=1e-3, min_lr=3e-4, lr_warmup_steps=1,
                                    lr_decay_steps=6, lr_decay_style="cosine", start_wd=0.1, end_wd=0.1,
                                    wd_incr_steps=6, wd_incr_style="constant")
    sched.step(3)
    assert rows[4]["lr"] == pytest.approx(_Opt.param_groups[0]["lr"], rel=1e-12)
    assert all(torch.isfinite(torch.tensor(rows[s]["loss"])) for s in (4, 5, 6))


def test_restart_from_an_early_step_prunes_the_stale_branch_not_its_own(four_checkpoints, tmp_path, data_cache):
    """Resumed from iter_1 in a folder holding 2..4, keep_last=1, stop after step 2: the old
    step-sorted prune deleted the loaded and the new checkpoint and kept the stale iter_4."""
    out = _copy(four_checkpoints, tmp_path / "run")
    (out / "training_complete.json").write_text('{"step": 4, "steps": 4}')  # from the earlier run
    root = out / "checkpoints"
    train(1, out, FAULT_STEPS + [f"train.load={root / 'iter_0000001'}", "train.keep_last_checkpoints=1",
                                 "train.exit_interval=2", "train.allow_overwrite=true"], cache_dir=data_cache)
    kept = sorted(p for p in os.listdir(root) if p.startswith("iter_"))
    assert kept == ["iter_0000001", "iter_0000002"]  # loaded + newest; the stale 3 and 4 pruned
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert not (out / "training_complete.json").exists()  # stopped early: a launcher must requeue


def test_a_typo_in_train_load_does_not_overwrite_the_run(four_checkpoints, tmp_path, data_cache):
    out = _copy(four_checkpoints, tmp_path / "run")
    before = {p: os.path.getmtime(out / "checkpoints" / p) for p in os.listdir(out / "checkpoints")}
    proc = train(1, out, FAULT_STEPS + [f"train.load={out / 'checkpoint'}"], cache_dir=data_cache, check=False)
    assert proc.returncode != 0
    assert "already holds checkpoints (steps [1, 2, 3, 4]) but train.load=" in proc.stdout + proc.stderr
    assert "train.allow_overwrite=true" in proc.stdout + proc.stderr
    assert {p: os.path.getmtime(out / "checkpoints" / p) for p in os.listdir(out / "checkpoints")} == before
