"""A one-process torch.distributed world for megatron's dataset builders.

megatron-core's dataset code is written for an initialized process group: in 0.16,
`BlendedDataset` calls `torch.distributed.get_rank()` unconditionally when its index
cache misses, so blending fails in a plain single-process run (a script, a test, a
notebook).  Rather than patch megatron, a single-process caller gets a throw-away gloo
world of size 1 (in-memory store, no network) for the duration of the build, so one
code path serves both cases.  An existing process group is used as is and never touched.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["process_group_for_dataset_build"]


@contextmanager
def process_group_for_dataset_build() -> Iterator[None]:
    """Run the body inside torch.distributed, creating a world of one only if needed."""
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
