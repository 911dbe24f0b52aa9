"""Per-step metrics: a Megatron-style progress line, DIR/metrics.jsonl and TensorBoard scalars.

Only one rank writes (global rank 0); the step's loss is already identical on all ranks.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from typing import Any, Dict, Optional

log = logging.getLogger("megatron_omni.train")


def format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


class MetricsWriter:
    """Appends one JSON object per step and mirrors numeric fields to TensorBoard."""

    def __init__(self, output_dir: str, *, enabled: bool, tensorboard: bool, start_step: int = 0):
        """`start_step`: the step this run starts after (the checkpoint's).  Rows of an earlier attempt
        past it (a crash after the last checkpoint) are dropped from metrics.jsonl, and TensorBoard
        purges its events from step `start_step + 1` on, so every step is recorded once."""
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, "metrics.jsonl")
        dropped = drop_rows_after(path, start_step)
        if dropped:
            log.info("%s: dropped %d rows past step %d written by an earlier attempt", path, dropped, start_step)
        self._jsonl = open(path, "a", buffering=1)  # a resumed run continues the same file
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard is a hard dependency; say so clearly
                raise RuntimeError("tensorboard is not installed: pip install tensorboard") from e
            tb_dir = os.path.join(output_dir, "tensorboard")
            # purge_step: TensorBoard readers discard the earlier attempt's events from that step on
            resuming = start_step > 0 or (os.path.isdir(tb_dir) and os.listdir(tb_dir))
            self._tb = SummaryWriter(log_dir=tb_dir, purge_step=start_step + 1 if resuming else None)

    def write(self, row: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(row) + "\n")
        if self._tb is not None:
            step = row["step"]
            for key, value in _flatten(row).items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def drop_rows_after(path: str, step: int) -> int:
    """Rewrite `path` (atomically) without the rows whose step is past `step`; returns how many."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    keep = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(keep) == len(lines):
        return 0
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)
    return len(lines) - len(keep)


def _flatten(row: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in row.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def progress_line(row: Dict[str, Any], *, total: int, eta_s: float) -> str:
    """Megatron-LM's progress line for a metrics row, plus what the task reported (validation
    loss, per-modality losses, skipped samples) when the row has it."""
    parts = [
        f"step {row['step']:>6d}/{total:<6d}",
        f"consumed samples: {row['consumed_samples']:>9d}",
        f"step time (ms): {row['step_time_s'] * 1e3:8.1f}",
        f"lr: {row['lr']:.3E}",
        f"loss: {row['loss']:.6E}",
        f"grad norm: {row['grad_norm']:.4f}" if row["grad_norm"] is not None else "grad norm: n/a",
        f"tokens/s: {row['tokens_per_s']:,.0f}",
        f"TFLOP/s/GPU: {row['tflops_per_gpu']:.3f}",
    ]
    if row["mfu"] is not None:
        parts.append(f"MFU: {100 * row['mfu']:.1f}%")
    parts.append(f"ETA {format_eta(eta_s)}")
    if "val_loss" in row:
        parts.append(f"val loss: {row['val_loss']:.6E}")
    parts += [f"{m} loss: {v:.4E}" for m, v in row.get("losses", {}).items()]
    if row.get("skipped_samples"):
        parts.append(f"skipped samples: {row['skipped_samples']}")
    return " | ".join(parts)


def timers_line(timers: Dict[str, float]) -> str:
    """Megatron-LM's timer log: `(max over ranks) times (ms) | name: value | ...` in the given order."""
    parts = [f"{name}: {ms:.2f}" for name, ms in timers.items()]
    return " | ".join(["(max over ranks) times (ms)", *parts])
