"""Test-only fault injection for the fault-tolerance suite (tests/faults/): real failures at
chosen points of a real multi-process run, switched on by one environment variable and inert
without it (one dictionary lookup per call site).

    MEGATRON_OMNI_INJECT_FAULT="kill@save:3:r1,enospc@save:5"

Each entry is KIND@POINT:STEP[:rRANK] (every rank when no rank is given):
  kill    SIGKILL this process (a node dying: no handler, no cleanup);
  enospc  raise OSError(ENOSPC), what a full disk raises inside the checkpoint writer.
Points: `step` (before the step's forward), `save` (after every shard of the step's checkpoint
is written, before its manifest and the tracker: the commit point).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from typing import List, NamedTuple

import torch.distributed as dist

log = logging.getLogger(__name__)

ENV = "MEGATRON_OMNI_INJECT_FAULT"
KINDS = ("kill", "enospc")
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
        if fault is None or fault.kind not in KINDS or fault.point not in POINTS or len(rank) > 1:
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
        if fault.point != point or fault.step != step or fault.rank not in (-1, rank):
            continue
        log.warning("fault injection: %s at %s of step %d on rank %d", fault.kind, point, step, rank)
        if fault.kind == "kill":
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, "No space left on device (injected)")
