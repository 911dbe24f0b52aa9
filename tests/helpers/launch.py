"""Run megatron_omni entry points as real multi-process gloo worlds (torchrun) and read their outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence

REPO = Path(__file__).resolve().parents[2]

# Small enough for 2 CPU cores, big enough that TP/PP/DP/VPP all have work to split.
TINY = [
    "data.seq_length=64",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.log_interval=1",
    "train.eval_interval=null",
    "optimizer.lr_warmup_steps=1",
]


def torchrun(nproc: int, module_args: Sequence[str], *, timeout: int = 600, env: Dict[str, str] = None,
             check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *module_args]
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath,
                **(env or {})}
    # Output to files, not pipes, and the launcher in a session of its own that is killed once it
    # exits: a SIGKILLed rank (tests/faults/) orphans megatron's checkpoint-writer helper
    # processes, which would hold a pipe open (a hang) and keep spinning after the test.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=out, stderr=err, text=True,
                                 start_new_session=True)
        try:
            child.wait(timeout=timeout)
        finally:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child.wait()
        out.seek(0), err.seek(0)
        proc = subprocess.CompletedProcess(cmd, child.returncode, out.read(), err.read())
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


def train(nproc: int, output_dir: Path, overrides: Sequence[str], *, cache_dir: Path,
          config: str = "configs/tiny/llm.yaml", **kwargs) -> subprocess.CompletedProcess:
    args = ["-m", "megatron_omni.train", "--config", config, *TINY,
            f"data.cache_dir={cache_dir}", f"train.output_dir={output_dir}", *overrides]
    return torchrun(nproc, args, **kwargs)


def metrics(output_dir: Path) -> List[dict]:
    """metrics.jsonl rows, the last row per step (a resumed run rewrites steps after its checkpoint)."""
    rows: Dict[int, dict] = {}
    with open(output_dir / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            rows[row["step"]] = row
    return [rows[k] for k in sorted(rows)]
