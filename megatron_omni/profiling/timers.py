"""Megatron timers for the training loop, each one also a `torch.profiler` range.

`StepTimers` is megatron-core's `Timers` (same names, log levels, barriers, so the
schedules, DDP's finalize_model_grads and the optimizer record into it exactly as in
Megatron-LM) whose timers additionally open a `record_function` range while they run
when a torch profiler is active.  The Chrome trace then shows `forward-compute`,
`all-grads-sync`, ... as annotations, and the trace analysis attributes every
collective to the timer it ran under (TP inside compute, DP inside grad sync, PP in
the p2p timers).

Timer names (megatron-core 0.16 unless noted) and log levels:
  level 0  train-step (ours: the whole `train_step`, loss reduction included)
  level 1  forward-backward (schedule, grad sync included), all-grads-sync,
           embedding-grads-all-reduce, non-tensor-parallel-grads-all-reduce,
           conditional-embedder-grads-all-reduce, optimizer (ours, as Megatron-LM's
           training.py), optimizer-copy-to-main-grad, optimizer-unscale-and-check-inf,
           optimizer-clip-main-grad, optimizer-count-zeros, optimizer-inner-step,
           optimizer-copy-main-to-model-params, params-all-gather
  level 2  forward-compute, backward-compute (per microbatch, summed), the p2p timers
           forward-recv/-send, backward-recv/-send and the combined send-recv ones,
           data-wait (ours: fetching microbatches, part of forward-compute),
           data-fetch (ours: the task planning the step's microbatches before the schedule,
           outside forward-backward -- an omni step draws them all from its data source there;
           an alignment-tuning step also runs its DPO reference forward there)
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional

import torch
from megatron.core.timers import Timer, Timers

TRAIN_STEP = "train-step"
DATA_WAIT = "data-wait"
DATA_FETCH = "data-fetch"
OPTIMIZER = "optimizer"
FORWARD_BACKWARD = "forward-backward"
FORWARD_COMPUTE = "forward-compute"
BACKWARD_COMPUTE = "backward-compute"

P2P_TIMERS = (
    "forward-recv", "forward-send", "backward-recv", "backward-send",
    "forward-send-backward-recv", "backward-send-forward-recv",
    "forward-send-forward-recv", "backward-send-backward-recv",
    "forward-backward-send-forward-backward-recv",
)
DP_GRAD_SYNC_TIMERS = ("all-grads-sync",)
OTHER_GRAD_SYNC_TIMERS = (
    "embedding-grads-all-reduce", "non-tensor-parallel-grads-all-reduce",
    "conditional-embedder-grads-all-reduce",
)
GRAD_SYNC_TIMERS = DP_GRAD_SYNC_TIMERS + OTHER_GRAD_SYNC_TIMERS
OPTIMIZER_TIMERS = (
    "optimizer-copy-to-main-grad", "optimizer-unscale-and-check-inf", "optimizer-clip-main-grad",
    "optimizer-count-zeros", "optimizer-inner-step", "optimizer-copy-main-to-model-params",
    "params-all-gather",
)
# Display order for logs and metrics rows; timers not listed follow alphabetically.
TIMER_ORDER = (
    TRAIN_STEP, DATA_FETCH, FORWARD_BACKWARD, FORWARD_COMPUTE, BACKWARD_COMPUTE, DATA_WAIT, *P2P_TIMERS,
    *GRAD_SYNC_TIMERS, OPTIMIZER, *OPTIMIZER_TIMERS,
)


def ordered(names) -> List[str]:
    rank = {n: i for i, n in enumerate(TIMER_ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


class RangeTimer(Timer):
    """A megatron Timer that is also a profiler range while it runs (only when profiling)."""

    def __init__(self, name: str):
        super().__init__(name)
        self._range = None

    def start(self, barrier: bool = False):
        super().start(barrier=barrier)
        if torch.autograd._profiler_enabled():
            self._range = torch.autograd.profiler.record_function(self.name)
            self._range.__enter__()

    def stop(self, barrier: bool = False):
        if self._range is not None:
            rng, self._range = self._range, None
            rng.__exit__(None, None, None)
        super().stop(barrier=barrier)


class StepTimers(Timers):
    """megatron `Timers` creating `RangeTimer`s; adds per-step reset and local readout."""

    def __call__(self, name: str, log_level: Optional[int] = None):
        fresh = name not in self._timers
        timer = super().__call__(name, log_level)
        if fresh and name in self._timers:
            timer = self._timers[name] = RangeTimer(name)
        return timer

    def reset_all(self) -> None:
        for timer in self._timers.values():
            timer.reset()

    def local_ms(self) -> Dict[str, float]:
        """This rank's elapsed time per timer since the last reset, in ms (timers keep running)."""
        return {name: 1e3 * timer.elapsed(reset=False) for name, timer in self._timers.items()}


class TimedIterator:
    """Wraps a microbatch iterator: each `next()` runs under the `data-wait` timer."""

    def __init__(self, iterator: Iterator, timers: Timers):
        self._iterator = iterator
        self._timers = timers

    def __iter__(self):
        return self

    def __next__(self):
        timer = self._timers(DATA_WAIT, log_level=2)
        timer.start()
        try:
            return next(self._iterator)
        finally:
            timer.stop()


class TimedTask:
    """A training task (`training/tasks/base.py::Task`) whose data reads are timed: planning a
    step's microbatches (`step_iterators`: for an omni step, drawing every microbatch from the
    data source and computing their loss scales, before the schedule starts) under `data-fetch`,
    and each microbatch read inside the schedule under `data-wait`.  Everything else is the
    wrapped task's."""

    def __init__(self, task, timers: Timers):
        self.task = task
        self._timers = timers
        self.cfg = task.cfg
        self.forward_step_func = task.forward_step_func

    def step_iterators(self, state) -> List[Optional[Iterator]]:
        timer = self._timers(DATA_FETCH, log_level=2)
        timer.start()
        try:
            iterators = self.task.step_iterators(state)
        finally:
            timer.stop()
        return [None if it is None else TimedIterator(it, self._timers) for it in iterators]

    def build_model(self, params_dtype):
        return self.task.build_model(params_dtype)

    def llm_flops_per_step(self) -> float:
        return self.task.llm_flops_per_step()

    def build_data(self, state) -> None:
        self.task.build_data(state)

    def step_metrics(self, state, result, step_time_s: float):
        return self.task.step_metrics(state, result, step_time_s)

    def step_samples(self, state):
        return self.task.step_samples(state)

    def validate(self, state):
        return self.task.validate(state)

    def state_dict(self):
        return self.task.state_dict()

    def load_state_dict(self, state) -> None:
        self.task.load_state_dict(state)

    def before_checkpoint(self) -> None:
        self.task.before_checkpoint()
