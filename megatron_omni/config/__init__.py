"""Typed run configuration: dataclasses (schema), YAML + overrides (loader), checks (validate)."""

from megatron_omni.config.loader import ConfigError, dump_config, from_dict, load_config, to_dict
from megatron_omni.config.schema import (
    DataConfig,
    DataSource,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)
from megatron_omni.config.validate import data_parallel_size, validate

__all__ = [
    "ConfigError", "DataConfig", "DataSource", "ModelConfig", "OptimizerConfig", "ParallelConfig",
    "RunConfig", "TrainConfig", "data_parallel_size", "dump_config", "from_dict", "load_config",
    "to_dict", "validate",
]
