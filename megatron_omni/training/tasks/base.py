"""`Task`: everything the training loop asks of what it trains.

`training/loop.py::pretrain` knows no model and no data kind: a task builds the model chunks and
the data readers, plans each step's microbatches, owns megatron's forward step (model call +
loss function), turns the step's loss reports into metrics, validates, and checkpoints its data
position (torchtitan's `TrainSpec`, Megatron-Bridge's per-recipe `forward_step`).  The loop calls,
in this order:

    build_model(params_dtype)      model chunks of this rank, initialised (before DDP and optimizer)
    build_data(state)              this rank's data (after the model: the omni vocabulary is the model's)
    state_dict()                   the data position the checkpoint saves / fills in (TrainState.data_state)
    load_state_dict(data_state)    after a resume (state.step > 0)
    per step:
      step_iterators(state)        one microbatch iterator per model chunk (None where a chunk reads none)
      forward_step_func            megatron's forward_step_func(data_iterator, model) -> (output, loss_func)
      step_metrics(state, result, step_time_s)
                                   the task's fields of the step's metrics row (collective)
      step_samples(state)          (kind, sample ids) per microbatch of this DP rank (spike / NaN logs)
    validate(state)                every train.eval_interval steps: the task's validation fields (collective)
    before_checkpoint()            quiesce background threads before megatron's checkpoint writer forks

A new task implements these and is returned by `tasks.task_for`; the loop does not change.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Tuple, runtime_checkable

import torch
import torch.distributed as dist

from megatron_omni.config import RunConfig, data_parallel_size
from megatron_omni.training.setup import TrainState
from megatron_omni.training.step import StepResult

StepSamples = List[Tuple[str, List[str]]]  # (modality / "text", sample ids) per microbatch


@runtime_checkable
class Task(Protocol):
    cfg: RunConfig
    # megatron forward_step_func: (data_iterator, model chunk) -> (output tensor, loss_func)
    forward_step_func: Callable

    def build_model(self, params_dtype: torch.dtype) -> List[torch.nn.Module]:
        """This rank's model chunks (one per virtual pipeline stage), weights initialised."""
        ...

    def llm_flops_per_step(self) -> float:
        """The backbone's FLOPs of one global batch, forward + backward (media encoders' FLOPs, which
        vary per step, come in the metrics row as `encoder_flops`)."""
        ...

    def build_data(self, state: TrainState) -> None: ...

    def step_iterators(self, state: TrainState) -> List[Optional[Iterator]]:
        """The iterators the next step (`state.step + 1`) reads its microbatches from."""
        ...

    def step_metrics(self, state: TrainState, result: StepResult, step_time_s: float) -> Dict[str, Any]: ...

    def step_samples(self, state: TrainState) -> StepSamples:
        """(kind, sample ids) of each of this DP rank's microbatches of the step just run."""
        ...

    def validate(self, state: TrainState) -> Dict[str, Any]: ...

    def state_dict(self) -> Optional[dict]:
        """This rank's data position beyond `state.consumed_samples` (None: nothing more)."""
        ...

    def load_state_dict(self, state: Optional[dict]) -> None: ...

    def before_checkpoint(self) -> None: ...


def num_microbatches(cfg: RunConfig) -> int:
    """Pipeline microbatches per step on each DP rank."""
    dp = data_parallel_size(cfg, dist.get_world_size())
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
