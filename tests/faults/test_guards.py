"""Divergence guard (training/guards.py) and the config checks that used to crash later."""

from __future__ import annotations

import math
import os

import pytest
import torch

from megatron_omni.config import ConfigError, load_config, validate
from tests.helpers.launch import metrics, train


@pytest.mark.parametrize("override, message", [
    ("train.micro_batch_size=0", "train.micro_batch_size=0 must be a number >= 1"),
    ("train.micro_batch_size=-1", "train.micro_batch_size=-1 must be a number >= 1"),
    ("train.log_interval=0", "train.log_interval=0 must be a number >= 1"),
    ("data.seq_length=0", "data.seq_length=0 must be a number >= 1"),
    ("train.global_batch_size=0", "train.global_batch_size=0 must be a number >= 1"),
    ("train.save_interval=0", "train.save_interval=0 must be a number >= 1 (or null)"),
    ("train.keep_last_checkpoints=0", "train.keep_last_checkpoints=0 must be a number >= 1 (or null)"),
    ("optimizer.lr=-1.0", "optimizer.lr=-1.0 must be a number >= 0"),
    ("optimizer.resume_schedule=newest", "optimizer.resume_schedule='newest' is not one of"),
    ("parallel.distributed_timeout_minutes=0", "parallel.distributed_timeout_minutes=0 must be a number >= 1"),
    ("train.loss_spike_window=0", "train.loss_spike_window=0 must be a number >= 1"),
])
def test_invalid_sizes_are_refused_with_the_key(override, message):
    cfg = load_config("configs/tiny/llm.yaml", [override])
    with pytest.raises(ConfigError) as err:
        validate(cfg, 1)
    assert message in str(err.value)


def test_nonfinite_steps_are_skipped_then_the_run_stops_with_a_finite_checkpoint(tmp_path, data_cache):
    """NaN gradients injected at steps 2, 4 and 5 (test hook), a NaN loss in step 4's first
    microbatch; train.skip_nonfinite_steps=2."""
    proc = train(1, tmp_path, ["train.steps=6", "train.skip_nonfinite_steps=2"], cache_dir=data_cache,
                 env={"MEGATRON_OMNI_INJECT_NONFINITE": "2,4,5", "MEGATRON_OMNI_INJECT_FAULT": "nanloss@step:4"},
                 check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "NonFiniteError: steps [4, 5] had non-finite losses or gradients" in log
    assert "step 2: non-finite loss or gradient (every microbatch's loss is finite: the gradients are not)" in log
    # the microbatch is named with its samples: step 4 reads samples 24.. (3 steps x 8), 2 per microbatch
    assert "step 4: non-finite loss or gradient (non-finite loss in 1 microbatch(es): DP rank 0 microbatch 0 " \
           "(text: train sample 24 (" in log and "), train sample 25 (" in log
    rows = {r["step"]: r for r in metrics(tmp_path)}
    assert sorted(rows) == [1, 2, 3, 4, 5]
    assert rows[2].get("skipped_update") and math.isnan(rows[2]["grad_norm"])
    assert not rows[3].get("skipped_update") and math.isfinite(rows[3]["grad_norm"])
    assert rows[3]["lr"] == rows[2]["lr"]  # the skipped step did not advance the LR schedule
    root = tmp_path / "checkpoints"
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
    assert not (tmp_path / "training_complete.json").exists()
    # the saved weights are the finite ones of step 3 (steps 4 and 5 changed nothing)
    from torch.distributed.checkpoint import FileSystemReader, load

    reader = FileSystemReader(str(root / "iter_0000005"))
    meta = reader.read_metadata().state_dict_metadata
    sd = {k: torch.empty(meta[k].size) for k in ("embedding.word_embeddings.weight",
                                                 "decoder.layers.self_attention.linear_qkv.weight")}
    load(sd, storage_reader=reader, no_dist=True)
    assert all(torch.isfinite(t).all() for t in sd.values())
    assert os.path.isfile(root / "iter_0000005" / "checksums.json")
