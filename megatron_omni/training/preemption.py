"""SIGTERM (SLURM preemption, `scancel`, torchrun shutdown) -> checkpoint at the next step boundary."""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class PreemptionHandler:
    """Records SIGTERM; `should_stop()` makes every rank agree (any rank signalled -> all stop)."""

    def __init__(self, signum: int = signal.SIGTERM):
        self.received = False
        self._signum = signum
        self._previous = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if not self.received:
            log.warning("received signal %d: will checkpoint and exit after this step", signum)
        self.received = True

    def should_stop(self) -> bool:
        flag = torch.tensor([1 if self.received else 0], dtype=torch.int32, device=torch.cuda.current_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        signal.signal(self._signum, self._previous)
