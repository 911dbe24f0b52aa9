"""Repo-wide fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One tokenized copy of the bundled corpus shared by every training run of the session."""
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The demo data set of tools/make_demo_data.py (every modality, ~0.6 MB, ~5 s), built once;
    copy it before changing it."""
    import subprocess
    import sys

    from tests.helpers.launch import REPO

    out = tmp_path_factory.mktemp("demo")
    subprocess.run([sys.executable, "tools/make_demo_data.py", "--out", str(out)], cwd=REPO, check=True,
                   capture_output=True, timeout=300)
    return out


FAULT_STEPS = ["train.steps=4", "train.save_interval=1"]


@pytest.fixture(scope="session")
def four_checkpoints(tmp_path_factory, data_cache):
    """One 1-rank run of the tiny text Llama (configs/tiny/llm.yaml), 4 steps with a checkpoint after
    every step (copy it before changing it): the fault tests' checkpoints, and a language-model-only
    checkpoint for the omni tests."""
    from tests.helpers.launch import train

    out = tmp_path_factory.mktemp("four_checkpoints")
    train(1, out, FAULT_STEPS, cache_dir=data_cache)
    return out
