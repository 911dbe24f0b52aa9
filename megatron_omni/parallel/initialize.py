"""Process-group and RNG setup: torch.distributed + megatron's parallel_state, on GPU or emulated CPU."""

from __future__ import annotations

import ctypes
import datetime
import glob
import logging
import os
import random
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_omni.config.schema import ParallelConfig
from megatron_omni.parallel import cpu_emulation

log = logging.getLogger(__name__)


def initialize_distributed(parallel: ParallelConfig) -> None:
    """Join the torchrun world (or a world of one) and build megatron's parallel groups.

    Without a GPU the CUDA emulation is switched on and gloo carries the collectives
    (`parallel.cuda_emulation`, see `use_cuda_emulation`); everything above this function is the
    same code on both.
    """
    use_cuda = not use_cuda_emulation(parallel.cuda_emulation)
    backend = parallel.backend if parallel.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        log.info("CUDA emulated on the CPU (parallel.cuda_emulation=%s)", parallel.cuda_emulation)
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


def nvidia_present() -> Optional[str]:
    """What shows an NVIDIA driver or GPU on this machine (device nodes, the kernel module, the
    driver's libcuda), or None when there is none at all."""
    nodes = sorted(glob.glob("/dev/nvidia[0-9]*")) + [p for p in ("/dev/nvidiactl",) if os.path.exists(p)]
    if nodes:
        return "device nodes " + ", ".join(nodes[:3])
    if os.path.exists("/proc/driver/nvidia/version"):
        return "the nvidia kernel module (/proc/driver/nvidia/version)"
    for lib in ("libcuda.so.1", "libcuda.so"):
        try:
            ctypes.CDLL(lib)
            return f"the driver library {lib}"
        except OSError:
            continue
    return None


def _cuda_failure() -> str:
    try:
        torch.cuda.init()
    except Exception as e:  # the driver's own reason (version mismatch, no device, ...)
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"torch.cuda.device_count() = {torch.cuda.device_count()}"


def use_cuda_emulation(mode: str) -> bool:
    """`parallel.cuda_emulation`: "on" always emulates; with CUDA working, "auto" and "off" do not;
    without it "off" is an error, and so is "auto" when an NVIDIA driver or device exists (a GPU
    node whose CUDA fails must not silently train on the CPU over gloo).  "auto" emulates only
    where no GPU can exist."""
    if mode == "on":
        return True
    if torch.cuda.is_available():
        return False
    if mode == "off":
        raise RuntimeError(f"parallel.cuda_emulation=off but CUDA is not available ({_cuda_failure()}); fix the "
                           "GPU setup, or set parallel.cuda_emulation=on to run on the CPU")
    evidence = nvidia_present()
    if evidence is not None:
        raise RuntimeError(f"CUDA failed to initialise although this machine has an NVIDIA driver/GPU ({evidence}): "
                           f"{_cuda_failure()}. Check nvidia-smi, the driver version against torch's CUDA "
                           f"({torch.version.cuda}) and CUDA_VISIBLE_DEVICES; parallel.cuda_emulation=on runs on "
                           "the CPU deliberately")
    return True


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
