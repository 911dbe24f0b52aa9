"""No hangs: every process group (the world and megatron's parallel groups) gets the timeout of
`parallel.distributed_timeout_minutes`, so the survivors of a stopped (not dead) rank give up
after it.  The wait itself (>= 1 minute) is not run in CI; a dead rank is test_injected_faults.py."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_omni.config import load_config
from megatron_omni.parallel.initialize import initialize_distributed
from tests.training.conftest import one_rank_world  # noqa: F401  (fixture)


def _timeout(group) -> datetime.timedelta:
    return group._get_backend(torch.device("cpu")).options._timeout


def test_every_process_group_times_out_after_the_configured_minutes(one_rank_world):  # noqa: F811
    cfg = load_config("configs/tiny/llm.yaml", ["parallel.distributed_timeout_minutes=3"])
    initialize_distributed(cfg.parallel)
    groups = [dist.distributed_c10d._get_default_group(), parallel_state.get_data_parallel_group(),
              parallel_state.get_tensor_model_parallel_group(), parallel_state.get_pipeline_model_parallel_group()]
    assert [_timeout(g) for g in groups] == [datetime.timedelta(minutes=3)] * len(groups)
