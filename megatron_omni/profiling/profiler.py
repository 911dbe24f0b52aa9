"""`StepProfiler`: what `pretrain(..., profiler=...)` calls around every step.

It installs `StepTimers` into the model config (schedules, finalize_model_grads) and the
optimizer config, times the task's data reads (`wrap_task`), reads every rank's timers after each step (rows of
metrics.jsonl get `timers`: ms, max over ranks, as Megatron-LM's ``log_option='max'``),
keeps the per-rank numbers on rank 0 for the report, and runs a `torch.profiler` window
over a range of steps, saving a Chrome trace per rank.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_omni.profiling.timers import TRAIN_STEP, StepTimers, TimedTask, ordered

log = logging.getLogger("megatron_omni.train")

# Keys of a metrics row kept per step for the report; the omni loop adds the per-modality
# tokens/s, the packed rows' LLM FLOPs and the encoders' FLOPs (the report's TFLOP/s, MFU and
# per-modality table need them).
RECORD_KEYS = ("step_time_s", "tokens_per_s", "tflops_per_gpu", "mfu", "tokens_per_s_by_modality",
               "llm_flops", "encoder_flops", "encoder_flops_by_modality")


@dataclass
class ProfileOptions:
    timing_log_level: int = 2  # megatron timer level: 0 step only, 1 + schedule/optimizer, 2 + compute/p2p/data
    trace_steps: Optional[Tuple[int, int]] = None  # first and last step (1-based, inclusive) under torch.profiler
    trace_dir: Optional[str] = None  # where trace_rank{r}.json go (default: train.output_dir)
    save_checkpoints: bool = False  # profiling runs skip checkpoint writes unless asked
    keep_records: bool = True  # keep every rank's timers per step on rank 0 (for the report)


def options_for_training(timing_log_level: Optional[int]) -> Optional[ProfileOptions]:
    """Timers for an ordinary training run (`train.timing_log_level`), checkpoints as usual."""
    if timing_log_level is None:
        return None
    return ProfileOptions(timing_log_level=timing_log_level, save_checkpoints=True, keep_records=False)


def _optimizers(optimizer) -> List[Any]:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


class StepProfiler:
    """Timers + trace window for one `pretrain` run; collective calls happen on every rank."""

    def __init__(self, options: Optional[ProfileOptions] = None):
        self.options = options or ProfileOptions()
        if not 0 <= self.options.timing_log_level <= 2:
            raise ValueError(f"timing_log_level must be 0..2, got {self.options.timing_log_level}")
        self.timers: Optional[StepTimers] = None
        self.meta: Dict[str, Any] = {}
        self.rank_info: List[Dict[str, int]] = []  # rank 0: every rank's layout coordinates
        self.records: List[Dict[str, Any]] = []  # rank 0: per step, every rank's timers
        self.trace_by_rank: List[Dict[str, Any]] = []  # rank 0: per-rank trace analysis
        self._torch_profiler = None
        self._traced_steps: List[int] = []
        self._trace_path: Optional[str] = None

    @property
    def save_checkpoints(self) -> bool:
        return self.options.save_checkpoints

    # ------------------------------------------------------------ setup

    def attach(self, cfg, state, meta: Dict[str, Any]) -> None:
        """Install the timers into the model chunks' and optimizers' configs."""
        self.timers = StepTimers(self.options.timing_log_level, "max")
        for chunk in state.model:
            chunk.config.timers = self.timers
        for opt in _optimizers(state.optimizer):
            config = getattr(opt, "config", None)
            if config is not None:
                config.timers = self.timers
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.meta = {**meta, "timing_log_level": self.options.timing_log_level}
        self._trace_dir = self.options.trace_dir or cfg.train.output_dir
        mine = {
            "rank": self.rank,
            "pp": parallel_state.get_pipeline_model_parallel_rank(),
            "tp": parallel_state.get_tensor_model_parallel_rank(),
            "cp": parallel_state.get_context_parallel_rank(),
            "dp": parallel_state.get_data_parallel_rank(),
        }
        self.rank_info = self._gather(mine) or []

    def wrap_task(self, task) -> TimedTask:
        """The training task with its data reads timed (`data-fetch`, `data-wait`)."""
        return TimedTask(task, self.timers)

    # ------------------------------------------------------------ per step

    def step_begin(self, step: int) -> None:
        """`step` is the 1-based number of the step about to run."""
        self.timers.reset_all()
        window = self.options.trace_steps
        if window and window[0] == step and self._torch_profiler is None:
            self._start_trace()
        if self._torch_profiler is not None:
            self._traced_steps.append(step)
        self.timers(TRAIN_STEP, log_level=0).start()

    def step_end(self, step: int, row: Dict[str, Any]) -> Dict[str, float]:
        """Stop the step timer, gather all ranks' timers; returns {name: max ms over ranks}."""
        self.timers(TRAIN_STEP).stop()
        local = self.timers.local_ms()
        with torch.autograd.profiler.record_function("profiler-gather"):
            gathered = self._gather(local)
        window = self.options.trace_steps
        if self._torch_profiler is not None and window and step >= window[1]:
            self._stop_trace()
        if gathered is None:
            return {}
        names = ordered({n for per_rank in gathered for n in per_rank})
        # Megatron-LM's 'max' option: the slowest rank per timer (ranks without the timer are skipped).
        maxima = {n: round(max(r.get(n, 0.0) for r in gathered), 3) for n in names}
        if self.options.keep_records:
            self.records.append({
                "step": step,
                **{k: row[k] for k in RECORD_KEYS if k in row},
                "traced": step in self._traced_steps,
                "ranks": gathered,
            })
        return maxima

    def close(self) -> None:
        """End of training: stop a trace still open, analyse each rank's trace, gather to rank 0."""
        if self._torch_profiler is not None:
            self._stop_trace()
        if self.options.trace_steps is None:
            return
        from megatron_omni.profiling.trace import analyze_trace

        mine: Dict[str, Any] = {"rank": dist.get_rank(), "file": self._trace_path}
        if self._trace_path and os.path.exists(self._trace_path):
            mine.update(analyze_trace(self._trace_path, num_steps=max(1, len(self._traced_steps))))
        self.trace_by_rank = self._gather(mine) or []

    # ------------------------------------------------------------ internals

    def _gather(self, obj: Any) -> Optional[List[Any]]:
        """gather_object to rank 0 (None elsewhere); a world of one skips the collective."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def _start_trace(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._torch_profiler = profile(activities=activities, record_shapes=False, with_stack=False)
            self._torch_profiler.start()

    def _stop_trace(self) -> None:
        prof, self._torch_profiler = self._torch_profiler, None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prof.stop()
        os.makedirs(self._trace_dir, exist_ok=True)
        self._trace_path = os.path.join(self._trace_dir, f"trace_rank{self.rank}.json")
        prof.export_chrome_trace(self._trace_path)
        if self.rank == 0:
            log.info("saved torch.profiler traces of steps %s to %s/trace_rank*.json",
                     ",".join(map(str, self._traced_steps)), self._trace_dir)
