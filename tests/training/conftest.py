"""Fixtures of the training tests."""

from __future__ import annotations

import socket

import pytest

from megatron_omni.parallel import cpu_emulation
from megatron_omni.parallel.initialize import destroy_distributed


@pytest.fixture
def one_rank_world(monkeypatch):
    """A one-process torch.distributed world for `build_train_state` in the test process itself."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    yield
    destroy_distributed()
    cpu_emulation.disable()
