"""Fixtures shared by the fault tests (tests/faults/)."""

from __future__ import annotations

import pytest

from tests.helpers.launch import train

FAULT_STEPS = ["train.steps=4", "train.save_interval=1"]


@pytest.fixture(scope="session")
def four_checkpoints(tmp_path_factory, data_cache):
    """One 1-rank tiny run of 4 steps with a checkpoint after every step (copy it before changing it)."""
    out = tmp_path_factory.mktemp("four_checkpoints")
    train(1, out, FAULT_STEPS, cache_dir=data_cache)
    return out
