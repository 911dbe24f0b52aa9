"""`run_profile`: N steps of any config under timers + a torch.profiler window, then a report.

Runs inside a torchrun world (every rank calls it); rank 0 writes DIR/report.md,
DIR/profile.json, DIR/time_split.png and DIR/step_time.png; every rank writes
DIR/trace_rank{r}.json.  DIR also gets the run's metrics.jsonl (rows with `timers`).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import torch.distributed as dist

from megatron_omni.profiling.profiler import ProfileOptions, StepProfiler

log = logging.getLogger("megatron_omni.train")

# Profiling runs neither evaluate nor checkpoint unless the overrides ask for eval.
RUN_DEFAULTS = ("train.eval_interval=null", "train.save_interval=null", "train.log_interval=1")


def default_trace_steps(steps: int, warmup: int) -> Optional[Tuple[int, int]]:
    """Two steps right after warmup (one if that is all there is)."""
    first = warmup + 1
    return (first, min(steps, first + 1)) if first <= steps else None


def parse_trace_steps(text: Optional[str], steps: int, warmup: int) -> Optional[Tuple[int, int]]:
    """'a:b' (1-based, inclusive) | 'a' | 'none' | None (= default window)."""
    if text is None:
        return default_trace_steps(steps, warmup)
    if text.strip().lower() in ("none", "off", ""):
        return None
    a, _, b = text.partition(":")
    first, last = int(a), int(b or a)
    if not 1 <= first <= last <= steps:
        raise ValueError(f"--trace-steps {text!r} must satisfy 1 <= a <= b <= steps ({steps})")
    return first, last


def run_profile(
    config: str, overrides: Sequence[str] = (), *, out: str, steps: int = 10, warmup: int = 2,
    trace_steps: Optional[Tuple[int, int]] = None, timing_log_level: int = 2, trace: bool = True,
) -> Optional[Dict[str, Any]]:
    """Train `steps` steps of `config` profiled; returns the summary on rank 0 (None elsewhere)."""
    from megatron_omni.config import load_config
    from megatron_omni.profiling.report import summarize, write_report
    from megatron_omni.training.loop import pretrain
    from megatron_omni.training.tasks import task_for

    if steps < 1 or not 0 <= warmup < steps:
        raise ValueError(f"need steps >= 1 and 0 <= warmup < steps, got steps={steps} warmup={warmup}")
    if trace and trace_steps is None:
        trace_steps = default_trace_steps(steps, warmup)
    cfg = load_config(config, [*RUN_DEFAULTS, *overrides, f"train.steps={steps}", f"train.output_dir={out}"])
    profiler = StepProfiler(ProfileOptions(
        timing_log_level=timing_log_level, trace_steps=trace_steps if trace else None, trace_dir=out,
    ))
    pretrain(cfg, task_for(cfg), profiler=profiler)
    if dist.get_rank() != 0:
        return None
    summary = summarize(
        {**profiler.meta, "config": config}, profiler.records, profiler.rank_info, profiler.trace_by_rank,
        warmup=warmup, trace_steps=trace_steps if trace else None,
    )
    path = write_report(out, summary)
    thr = summary["throughput"]
    log.info("profile: %.0f tokens/s | %.4f TFLOP/s/GPU | MFU %s | step %.1f ms (p50 %.1f) | report %s",
             thr["tokens_per_s"], thr["tflops_per_gpu"],
             "n/a" if thr["mfu"] is None else f"{100 * thr['mfu']:.1f}%",
             summary["step_time_ms"]["mean"], summary["step_time_ms"]["p50"], os.path.abspath(path))
    if summary["modalities"]:
        log.info("profile per modality (tokens/s, encoder share of its FLOPs): %s | encoders %.1f%% of the FLOPs",
                 ", ".join(f"{r['modality']} {r['tokens_per_s']:.0f} ({100 * r['encoder_share']:.1f}%)"
                           for r in summary["modalities"]), 100 * thr["encoder_flops_share"])
    return summary
