"""train.load on a folder without checkpoints starts fresh (Megatron-LM's --load), a bad iter_ folder is an error."""

from __future__ import annotations

import pytest

from megatron_omni.training.checkpoint import TRACKER_FILE, latest_step, load_checkpoint


def test_missing_or_empty_checkpoint_folder_means_fresh_start(tmp_path):
    assert latest_step(str(tmp_path / "nope")) is None
    assert load_checkpoint(state=None, root=str(tmp_path / "nope")) is None  # never touches the state


def test_corrupt_tracker_and_non_checkpoint_iter_folder_are_errors(tmp_path):
    (tmp_path / TRACKER_FILE).write_text("abc")
    with pytest.raises(ValueError, match="expected an iteration number, found 'abc'"):
        latest_step(str(tmp_path))
    (tmp_path / "iter_0000007").mkdir()
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        load_checkpoint(state=None, root=str(tmp_path / "iter_0000007"))
