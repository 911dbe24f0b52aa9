"""A tiny MoE model config and a one-process megatron world to build MoE layers in."""

from __future__ import annotations

import copy

from megatron_omni.config import load_config
from megatron_omni.config.schema import ModelConfig

TINY_RUN = "configs/tiny/moe_llm.yaml"


def tiny_moe_model(**moe_overrides) -> ModelConfig:
    model = copy.deepcopy(load_config(TINY_RUN).model)
    for key, value in moe_overrides.items():
        setattr(model.moe, key, value)
    return model
