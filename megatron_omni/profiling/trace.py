"""Read a `torch.profiler` Chrome trace: collective time per rank, attributed to TP/PP/DP.

Collectives are the backend's own events: ``gloo:all_reduce``/``gloo:send``/... on CPU
(the time the work took, peer waits included), and on GPU the NCCL kernels
(``ncclDevKernel_*``/``ncclKernel_*``, GPU time).  Each is attributed to the innermost
megatron timer range it ran under (`StepTimers` makes every timer a profiler range;
a GPU kernel counts at its launch):

  tp           under forward-compute / backward-compute: tensor-parallel all-reduces,
               all-gathers and vocab-parallel cross entropy (CP/EP traffic too, when used)
  pp           under the p2p timers (forward-recv, backward-send-forward-recv, ...):
               pipeline sends/receives, waiting for the neighbour stage included
  dp           under all-grads-sync / params-all-gather: gradient reduce(-scatter) and
               the distributed optimizer's parameter all-gather
  grads_other  under embedding-grads-all-reduce / non-tensor-parallel-grads-all-reduce
  optimizer    under the other optimizer timers (grad-norm and found-inf all-reduces)
  barrier      barriers (the level-1 timers' own synchronisation)
  profiler     the profiler's own per-step timer gather
  other        anything else (loss broadcast, token-count reductions, ...)

Only collectives inside a ``train-step`` range count (evaluation or checkpointing inside
the trace window are left out); numbers are per traced step.
"""

from __future__ import annotations

import bisect
import json
from typing import Any, Dict, List, Tuple

from megatron_omni.profiling.timers import (
    BACKWARD_COMPUTE,
    DP_GRAD_SYNC_TIMERS,
    FORWARD_COMPUTE,
    OPTIMIZER_TIMERS,
    OTHER_GRAD_SYNC_TIMERS,
    P2P_TIMERS,
    TRAIN_STEP,
)

CATEGORIES = ("tp", "pp", "dp", "grads_other", "optimizer", "barrier", "profiler", "other")
COMM_CATEGORIES = ("tp", "pp", "dp", "grads_other", "optimizer")

_RANGE_CATEGORY: Dict[str, str] = {
    FORWARD_COMPUTE: "tp", BACKWARD_COMPUTE: "tp",
    **{n: "pp" for n in P2P_TIMERS},
    **{n: "dp" for n in DP_GRAD_SYNC_TIMERS}, "params-all-gather": "dp",
    **{n: "grads_other" for n in OTHER_GRAD_SYNC_TIMERS},
    **{n: "optimizer" for n in OPTIMIZER_TIMERS if n != "params-all-gather"},
    "profiler-gather": "profiler",
}


def is_cpu_collective(name: str) -> bool:
    return name.startswith("gloo:") or name.startswith("nccl:") or name.startswith("mpi:")


def is_gpu_collective(event: Dict[str, Any]) -> bool:
    return event.get("cat") == "kernel" and event.get("name", "").lower().startswith("nccl")


def load_events(path: str) -> List[Dict[str, Any]]:
    with open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X"]


def _innermost(ranges: List[Tuple[float, float, str]], starts: List[float], ts: float) -> str:
    """Name of the latest-starting range that contains ts (ranges sorted by start)."""
    i = bisect.bisect_right(starts, ts)
    while i > 0:
        i -= 1
        start, end, name = ranges[i]
        if start <= ts <= end:
            return name
    return ""


def categorize(op_name: str, enclosing: str) -> str:
    if "barrier" in op_name.lower():
        return "barrier"
    return _RANGE_CATEGORY.get(enclosing, "other")


def analyze_events(events: List[Dict[str, Any]], num_steps: int = 1) -> Dict[str, Any]:
    """Collective time per category and per op, in ms per traced step."""
    ranges = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e["name"])
        for e in events if e.get("cat") == "user_annotation" and e.get("name") in _RANGE_CATEGORY
    )
    # Only the timer ranges that matter for attribution; the others (train-step, forward-backward,
    # optimizer) would shadow nothing, so attributing inside them gives "other".
    starts = [r[0] for r in ranges]
    gpu = [e for e in events if is_gpu_collective(e)]
    if gpu:
        launches = {
            e["args"]["correlation"]: float(e["ts"])
            for e in events if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})
        }
        comm = [(e["name"], float(e["ts"]), float(e.get("dur", 0)),
                 launches.get(e.get("args", {}).get("correlation"), -1.0)) for e in gpu]
        source = "gpu nccl kernels"
    else:
        comm = [(e["name"], float(e["ts"]), float(e.get("dur", 0)), float(e["ts"]))
                for e in events if is_cpu_collective(e["name"])]
        source = "cpu collective ops"
    # Only what ran inside training steps (not evaluation, checkpointing or the timer gather
    # between steps, which the trace window may also cover).
    steps = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
                   for e in events if e.get("cat") == "user_annotation" and e.get("name") == TRAIN_STEP)
    if steps:
        comm = [c for c in comm if any(a <= c[3] <= b for a, b in steps)]
    by_cat = {c: 0.0 for c in CATEGORIES}
    intervals: Dict[str, List[Tuple[float, float]]] = {c: [] for c in CATEGORIES}
    by_op: Dict[str, Dict[str, float]] = {}
    for name, start, dur_us, anchor in comm:
        cat = categorize(name, _innermost(ranges, starts, anchor) if anchor >= 0 else "")
        by_cat[cat] += dur_us
        intervals[cat].append((start, start + dur_us))
        op = name if not name.lower().startswith("nccl") or ":" in name else name.split("(")[0]
        slot = by_op.setdefault(op, {"count": 0, "ms": 0.0})
        slot["count"] += 1
        slot["ms"] += dur_us / 1e3
    span_us = (max(float(e["ts"]) + float(e.get("dur", 0)) for e in events) - min(float(e["ts"]) for e in events)
               if events else 0.0)
    n = max(1, num_steps)
    return {
        "source": source,
        "num_events": len(events),
        "num_collectives": len(comm),
        "traced_steps": n,
        "span_ms": span_us / 1e3,
        # Wall time with at least one op of the category in flight (overlapping async ops,
        # e.g. a batched send+recv pair, count once) and the plain sum of op durations.
        "comm_ms_per_step": {c: _union_us(v) / 1e3 / n for c, v in intervals.items()},
        "comm_sum_ms_per_step": {c: v / 1e3 / n for c, v in by_cat.items()},
        "comm_busy_ms_per_step": _union_us([i for c in COMM_CATEGORIES + ("other",) for i in intervals[c]]) / 1e3 / n,
        "ops_per_step": {k: {"count": v["count"] / n, "ms": v["ms"] / n} for k, v in sorted(by_op.items())},
    }


def _union_us(intervals: List[Tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def analyze_trace(path: str, num_steps: int = 1) -> Dict[str, Any]:
    return analyze_events(load_events(path), num_steps=num_steps)
