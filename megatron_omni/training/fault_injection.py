"""Test-only fault injection for the fault-tolerance suite (tests/faults/): real failures at
chosen points of a real multi-process run, switched on by one environment variable and inert
without it (one dictionary lookup per call site).

    MEGATRON_OMNI_INJECT_FAULT="kill@save:3:r1,enospc@save:5"

Each entry is KIND@POINT:STEP[:rRANK] (every rank when no rank is given):
  kill    SIGKILL this process (a node dying: no handler, no cleanup);
  enospc  raise OSError(ENOSPC), what a full disk raises inside the checkpoint writer;
  spike   (point `step` only; rRANK is a *DP* rank, all its TP/PP ranks alike) the reported loss
          of that DP rank's first microbatch of the step x SPIKE_SCALE: a loss spike for the
          spike log (training/loss_spikes.py) to catch and attribute.  Only the loss reports are
          scaled, not the loss the gradients come from, so the run trains on unchanged;
  nanloss (point `step` only, rRANK a DP rank) the same with NaN: a non-finite loss for the
          divergence guard (training/guards.py) to skip and name.
Points: `step` (before the step's forward), `save` (after every shard of the step's checkpoint
is written, before its manifest and the tracker: the commit point).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from typing import Callable, List, NamedTuple

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

ENV = "MEGATRON_OMNI_INJECT_FAULT"
KINDS = ("kill", "enospc", "spike", "nanloss")
LOSS_FAULTS = {"spike": 1000.0, "nanloss": float("nan")}  # report scale per kind
POINTS = ("step", "save")


class Fault(NamedTuple):
    kind: str
    point: str
    step: int
    rank: int  # -1: every rank


def parse_faults(spec: str) -> List[Fault]:
    faults = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        try:
            kind, rest = entry.split("@")
            point, step, *rank = rest.split(":")
            fault = Fault(kind, point, int(step), int(rank[0].lstrip("r")) if rank else -1)
        except ValueError:
            fault = None
        if fault is None or fault.kind not in KINDS or fault.point not in POINTS or len(rank) > 1 or \
                (fault.kind in LOSS_FAULTS and fault.point != "step"):
            raise ValueError(f"${ENV}: bad entry {entry!r}; expected KIND@POINT:STEP[:rRANK] with KIND in {KINDS} "
                             f"and POINT in {POINTS}, e.g. kill@save:3:r1")
        faults.append(fault)
    return faults


def maybe_inject(point: str, step: int) -> None:
    """Fire the faults of $MEGATRON_OMNI_INJECT_FAULT planned for (`point`, `step`) on this rank."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    rank = dist.get_rank() if dist.is_initialized() else 0
    for fault in parse_faults(spec):
        if fault.kind in LOSS_FAULTS or fault.point != point or fault.step != step or fault.rank not in (-1, rank):
            continue
        log.warning("fault injection: %s at %s of step %d on rank %d", fault.kind, point, step, rank)
        if fault.kind == "kill":
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, "No space left on device (injected)")


def spiked_forward_step(forward_step_func: Callable, step: int) -> Callable:
    """`forward_step_func`, or on a planned `spike|nanloss@step:STEP[:rDP]` of this DP rank a
    wrapper whose first microbatch's loss reports ([loss_sum, tokens] pairs) are scaled by
    x1000 (spike) or NaN (nanloss)."""
    spec = os.environ.get(ENV)
    if not spec:
        return forward_step_func
    from megatron.core import parallel_state

    dp_rank = parallel_state.get_data_parallel_rank()
    kinds = [f.kind for f in parse_faults(spec) if f.kind in LOSS_FAULTS and f.step == step and f.rank in (-1, dp_rank)]
    if not kinds:
        return forward_step_func
    scale = LOSS_FAULTS[kinds[0]]
    log.warning("fault injection: %s at step %d on DP rank %d (microbatch 0 loss reports x%g)", kinds[0], step,
                dp_rank, scale)
    scaled = []

    def forward_step(data_iterator, model):
        output, loss_func = forward_step_func(data_iterator, model)

        def spiked_loss(output_tensor):
            loss, count, reports = loss_func(output_tensor)
            if scaled:  # the last pipeline stage calls the loss function once per microbatch
                return loss, count, reports
            scaled.append(True)
            return loss, count, {k: v * torch.tensor([scale, 1.0], device=v.device, dtype=v.dtype)
                                 if v.shape == (2,) else v for k, v in reports.items()}

        return output, spiked_loss

    return forward_step
