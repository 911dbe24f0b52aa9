"""Divergence guards: a step with a non-finite loss or gradient is skipped, not applied.

Megatron-LM checks for NaN/Inf in the loss and the gradients and stops the job; megatron-core's
DDP does the same check per bucket *before* the data-parallel collective, on the rank that has
it -- a RuntimeError on one rank while the others wait in the all-reduce.  With
`train.skip_nonfinite_steps: N` (N > 0) the DDP check is switched off and every rank agrees,
after the gradient reduction, whether the global batch's loss and gradients are finite (one
all-reduce of a flag): if not, the optimizer and the LR schedule skip the step and the loop logs
it; after N consecutive skipped steps the run saves the (unchanged, last good) weights and stops
with `NonFiniteError` naming the steps.  Parameters and optimizer state are checked finite before
every save.

Test-only fault injection: MEGATRON_OMNI_INJECT_NONFINITE="3,4" puts a NaN into the gradients
of those steps (1-based) on every rank.
"""

from __future__ import annotations

import logging
import os
from typing import List, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

INJECT_ENV = "MEGATRON_OMNI_INJECT_NONFINITE"


class NonFiniteError(RuntimeError):
    """The loss, gradients or parameters are NaN/Inf."""


def _world_any(flag: bool) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=torch.cuda.current_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _grad_buffers(model: List[torch.nn.Module]):
    for chunk in model:
        for buffer in getattr(chunk, "buffers", []) + getattr(chunk, "expert_parallel_buffers", []):
            yield buffer.grad_data


def disable_ddp_nan_check(model: List[torch.nn.Module]) -> None:
    """The guard replaces DDP's per-rank, pre-collective NaN check (which raises on one rank)."""
    for chunk in model:
        if hasattr(chunk, "ddp_config"):
            chunk.ddp_config.check_for_nan_in_grad = False
        for group in getattr(chunk, "bucket_groups", []) + getattr(chunk, "expert_parallel_bucket_groups", []):
            group.ddp_config.check_for_nan_in_grad = False


def inject_nonfinite(model: List[torch.nn.Module], step: int) -> None:
    """Test hook: NaN gradients at the steps listed in $MEGATRON_OMNI_INJECT_NONFINITE."""
    steps = os.environ.get(INJECT_ENV)
    if steps and str(step) in steps.split(","):
        for grad in _grad_buffers(model):
            grad.view(-1)[:1] = float("nan")
            return


def step_is_finite(model: List[torch.nn.Module], loss: float) -> bool:
    """Collective over the world: the (global) loss and every rank's reduced gradients are finite."""
    local = torch.isfinite(torch.tensor(loss)).item()
    for grad in _grad_buffers(model):
        if local and not torch.isfinite(grad).all().item():
            local = False
    return not _world_any(not local)


def _optimizer_state_tensors(optimizer):
    """The floating-point state (Adam moments, fp32 main params) of megatron's (chained) optimizer."""
    if optimizer is None:
        return
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            for value in state.values():
                if torch.is_tensor(value) and value.is_floating_point():
                    yield value
        for name in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups"):  # bf16/fp16 main params
            for group in getattr(sub, name, None) or []:
                yield from group


@torch.no_grad()
def parameters_finite(model: List[torch.nn.Module], optimizer=None) -> bool:
    """Collective over the world: every parameter (and, given `optimizer`, every optimizer state
    tensor) of every rank is finite.  Before a save only, not per step."""
    local = all(bool(torch.isfinite(p).all()) for chunk in model for p in chunk.parameters()) and \
        all(bool(torch.isfinite(t).all()) for t in _optimizer_state_tensors(optimizer))
    return not _world_any(not local)


class NonFiniteGuard:
    """Counts consecutive skipped steps; `record` raises once more than `limit` were skipped."""

    def __init__(self, limit: int):
        self.limit = limit
        self.skipped: List[int] = []

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def record(self, step: int, finite: bool, detail: str = "") -> Optional[str]:
        """Returns the stop message when the limit is reached, else None."""
        if finite:
            self.skipped = []
            return None
        self.skipped.append(step)
        log.warning("step %d: non-finite loss or gradient%s; the update was skipped (%d consecutive, "
                    "train.skip_nonfinite_steps=%d)", step, detail, len(self.skipped), self.limit)
        if len(self.skipped) >= self.limit:
            return (f"steps {self.skipped} had non-finite losses or gradients{detail} "
                    f"(train.skip_nonfinite_steps={self.limit} consecutive): the run diverged; the last finite "
                    "weights were saved. Lower optimizer.lr, check the data of these steps, or resume from an "
                    "earlier checkpoint")
        return None
