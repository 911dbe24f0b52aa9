"""The converter's one-process megatron world leaves the caller's ParallelConfig as it was."""

import dataclasses

from megatron.core import parallel_state

from megatron_omni.config.schema import ParallelConfig
from megatron_omni.convert.mcore_io import megatron_world


def test_megatron_world_does_not_modify_the_callers_parallel_config():
    parallel = ParallelConfig(backend="nccl")
    before = dataclasses.asdict(parallel)
    with megatron_world(parallel):
        assert parallel_state.model_parallel_is_initialized()
    assert dataclasses.asdict(parallel) == before
