"""Repo-wide fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One tokenized copy of the bundled corpus shared by every training run of the session."""
    return tmp_path_factory.mktemp("data_cache")
