"""The check groups, in the order they run; each module has CHECKS, BUDGET_S, plan(ctx), run(ctx, emit)."""

from __future__ import annotations

import importlib
from typing import List

GROUPS = ("train", "throughput", "packed_attention", "transformer_engine", "dali")
MODULES = {
    "train": "megatron_omni.gpu_check.train_checks",
    "throughput": "megatron_omni.gpu_check.throughput",
    "packed_attention": "megatron_omni.gpu_check.packed_attention",
    "transformer_engine": "megatron_omni.gpu_check.transformer_engine",
    "dali": "megatron_omni.gpu_check.dali_decode",
}


def group(name: str):
    if name not in MODULES:
        raise ValueError(f"unknown check group {name!r}; groups: {', '.join(GROUPS)}")
    return importlib.import_module(MODULES[name])


def all_checks() -> List[str]:
    return [c for g in GROUPS for c in group(g).CHECKS]
