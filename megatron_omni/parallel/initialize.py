"""Process-group and RNG setup: torch.distributed + megatron's parallel_state, on GPU or emulated CPU."""

from __future__ import annotations

import datetime
import logging
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_omni.config.schema import ParallelConfig
from megatron_omni.parallel import cpu_emulation

log = logging.getLogger(__name__)


def initialize_distributed(parallel: ParallelConfig) -> None:
    """Join the torchrun world (or a world of one) and build megatron's parallel groups.

    Without a GPU the CUDA emulation is switched on and gloo carries the collectives;
    everything above this function is the same code on both.
    """
    use_cuda = torch.cuda.is_available()
    backend = parallel.backend if parallel.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        cpu_emulation.enable()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend=backend,
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            timeout=datetime.timedelta(minutes=parallel.distributed_timeout_minutes),
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        distributed_timeout_minutes=parallel.distributed_timeout_minutes,
    )


def set_random_seeds(seed: int) -> None:
    """Seed Python/NumPy/torch and megatron's tensor-parallel RNG tracker.

    Every rank uses the same base seed; megatron's tracker derives the per-TP-rank
    stream for sharded dropout.  Weight init does not depend on these streams (see
    models/init.py), so the same seed gives the same model at every layout.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
