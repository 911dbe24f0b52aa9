"""Training runs the checks compare: N profiled steps of a run config in this process (the
project's `run_profile`), or the same run in a child process on the CPU (CUDA emulated) as the
reference, and the per-step losses of either."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

# Checks neither write checkpoints nor tensorboard events, and log every step.
RUN_OVERRIDES = ("train.tensorboard=false", "train.save_interval=null", "train.eval_interval=null")


@dataclass
class RunOutput:
    losses: List[float]
    summary: Optional[Dict[str, Any]]  # profiling/report.summarize's dict (None for a reference run)
    peak_memory_bytes: Optional[int] = None  # torch.cuda.max_memory_allocated over the run (CUDA only)


def read_losses(out: str) -> List[float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [float(json.loads(line)["loss"]) for line in f if line.strip()]


def set_fp32_exact(on: bool) -> None:
    """fp32 GEMMs / convolutions without TF32 (the CPU reference computes in true fp32)."""
    import torch

    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = not on
        torch.backends.cudnn.allow_tf32 = not on


def train_run(config: str, overrides: Sequence[str], *, out: str, steps: int, warmup: int = 1) -> RunOutput:
    """`steps` profiled training steps of `config` in this process (a world of one)."""
    import torch

    from megatron_omni.profiling import run_profile

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    summary = run_profile(config, [*RUN_OVERRIDES, *overrides], out=out, steps=steps, warmup=warmup, trace=False)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return RunOutput(read_losses(out), summary, peak)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(*, cpu: bool) -> Dict[str, str]:
    """A child process of its own (world of one, own rendezvous port); `cpu` hides every GPU so the
    child runs megatron-core through the CPU emulation."""
    from megatron_omni.gpu_check.context import REPO

    env = dict(os.environ)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def start_cpu_reference(config: str, overrides: Sequence[str], *, out: str, steps: int) -> subprocess.Popen:
    """The same run on the CPU in a child process (started now, awaited by `finish_reference`)."""
    os.makedirs(out, exist_ok=True)
    spec = json.dumps({"config": config, "overrides": list(overrides), "out": out, "steps": steps})
    log = open(os.path.join(out, "reference.log"), "w")
    return subprocess.Popen([sys.executable, "-m", "megatron_omni.gpu_check.worker", "--train-run", spec],
                            env=child_env(cpu=True), stdout=log, stderr=subprocess.STDOUT)


def finish_reference(proc: subprocess.Popen, out: str, timeout: float) -> List[float]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise RuntimeError(f"the CPU reference run did not finish in {timeout:.0f} s (log: {out}/reference.log)")
    if rc != 0:
        raise RuntimeError(f"the CPU reference run failed (exit {rc}); log: {out}/reference.log")
    return read_losses(out)
