"""Loss spikes: a step whose loss exceeds `train.loss_spike_factor` x the median loss of the last
`train.loss_spike_window` steps is logged with the samples of every microbatch of the step, on
every DP rank, and appended to DIR/loss_spikes.jsonl.

The reference is a running *median*, not an EMA: a spike pulls an EMA up (so a burst of spikes
hides its own followers) while the median ignores up to half the window of outliers; and after a
lasting level shift (a new data stage) the median follows within window/2 steps instead of
flagging every step.  Spikes stay in the window for that reason.  Non-finite losses are the
divergence guard's (training/guards.py) and never enter it.  The window is checkpointed
(`TrainState.recent_losses`), so detection continues across a resume.

Cost: on a normal step one comparison of the loss every rank already holds on the host (the
decision is the same on every rank, so the gather below is entered by all or none).  Only on a
spike: this step's per-microbatch loss reports are read from the device and one `gather_object`
over the world brings each DP rank's (modality, sample ids, loss) per microbatch to rank 0.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_omni.training.metrics import drop_rows_after
from megatron_omni.training.omni_step import MODALITY_LOSS_PREFIX  # preference microbatches have no LM loss
from megatron_omni.training.step import LM_LOSS

log = logging.getLogger("megatron_omni.train")

SPIKES_FILE = "loss_spikes.jsonl"

# One entry per microbatch of this DP rank's step, in schedule order: (modality, sample ids).
StepSamples = List[Tuple[str, List[str]]]


class LossSpikeDetector:
    """`check(loss)` -> the reference (median) when `loss` is a spike, else None; appends the loss
    to `recent` (a list kept to the last `window` finite losses, saved with the checkpoint)."""

    def __init__(self, factor: float, window: int, recent: List[float]):
        self.factor, self.window, self.recent = factor, window, recent
        del self.recent[:-window]

    def check(self, loss: float) -> Optional[float]:
        if not math.isfinite(loss):
            return None
        reference = None
        if len(self.recent) == self.window:  # a full window: no verdict on the first steps of a run
            median = statistics.median(self.recent)
            if median > 0 and loss > self.factor * median:
                reference = median
        self.recent.append(loss)
        del self.recent[:-self.window]
        return reference


def drop_records_after(output_dir: str, step: int) -> None:
    """A resumed run (rank 0) forgets the spikes a crashed attempt logged past its checkpoint."""
    drop_rows_after(os.path.join(output_dir, SPIKES_FILE), step)


def _microbatch_loss(report: Dict[str, torch.Tensor], modality: str) -> Optional[List[float]]:
    for name in (LM_LOSS, MODALITY_LOSS_PREFIX + modality):
        if name in report:
            return [float(v) for v in report[name].tolist()]  # on a spike only: a device read
    return None


def _local_microbatches(samples: StepSamples, losses_reduced: Sequence[Dict[str, torch.Tensor]]) -> Optional[list]:
    """This rank's share of the record: the last pipeline stage holds the per-microbatch loss
    reports (every TP rank the same: TP rank 0 speaks; each CP rank a part: summed on rank 0)."""
    if parallel_state.get_tensor_model_parallel_rank() != 0 or \
            not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    dp = parallel_state.get_data_parallel_rank()
    out = []
    for k, (modality, ids) in enumerate(samples):
        report = _microbatch_loss(losses_reduced[k], modality) if k < len(losses_reduced) else None
        out.append({"dp_rank": dp, "microbatch": k, "modality": modality, "samples": list(ids),
                    "loss_sum_tokens": report})
    return out


def _merge(gathered: Sequence[Optional[list]]) -> List[dict]:
    merged: Dict[Tuple[int, int], dict] = {}
    for part in gathered:
        for mb in part or []:
            key = (mb["dp_rank"], mb["microbatch"])
            have = merged.setdefault(key, {**mb, "loss_sum_tokens": None})
            if mb["loss_sum_tokens"] is not None:  # context-parallel ranks: partial sums
                old = have["loss_sum_tokens"] or [0.0, 0.0]
                have["loss_sum_tokens"] = [a + b for a, b in zip(old, mb["loss_sum_tokens"])]
    rows = []
    for key in sorted(merged):
        mb = merged[key]
        sums = mb.pop("loss_sum_tokens")
        mb["loss"] = sums[0] / sums[1] if sums and sums[1] > 0 else None
        mb["tokens"] = int(sums[1]) if sums else None
        rows.append(mb)
    return rows


def gather_step_microbatches(samples: StepSamples, losses_reduced: Sequence[Dict[str, torch.Tensor]]
                             ) -> Optional[List[dict]]:
    """Collective over the world: on rank 0 every DP rank's microbatches of the step, as
    {dp_rank, microbatch, modality, samples, loss, tokens}; None elsewhere."""
    mine = _local_microbatches(samples, losses_reduced)
    rank0 = dist.get_rank() == 0
    gathered = [None] * dist.get_world_size() if rank0 else None
    dist.gather_object(mine, gathered, dst=0)
    return _merge(gathered) if rank0 else None


def nonfinite_detail(microbatches: Optional[List[dict]]) -> str:
    """For the divergence guard's message (rank 0): which microbatches had a non-finite loss."""
    if microbatches is None:
        return ""
    bad = [mb for mb in microbatches if mb["loss"] is not None and not math.isfinite(mb["loss"])]
    if not bad:
        return " (every microbatch's loss is finite: the gradients are not)"
    named = "; ".join(f"DP rank {mb['dp_rank']} microbatch {mb['microbatch']} ({mb['modality']}: "
                      f"{', '.join(mb['samples'])})" for mb in bad[:4])
    return f" (non-finite loss in {len(bad)} microbatch(es): {named}{'; ...' if len(bad) > 4 else ''})"


def record_spike(output_dir: str, *, step: int, loss: float, reference: float, factor: float, window: int,
                 samples: StepSamples, losses_reduced: Sequence[Dict[str, torch.Tensor]],
                 modality_losses: Optional[Dict[str, float]] = None) -> None:
    """Collective over the world (every rank saw the same spike): rank 0 logs the spike and appends
    the step's microbatches (DP rank, index, modality, sample ids, loss) to loss_spikes.jsonl."""
    microbatches = gather_step_microbatches(samples, losses_reduced)
    if microbatches is None:
        return
    row = {"step": step, "loss": loss, "reference": reference, "factor": factor, "window": window,
           "losses": modality_losses or {}, "microbatches": microbatches}
    path = os.path.join(output_dir, SPIKES_FILE)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    worst = max((mb for mb in microbatches if mb["loss"] is not None), key=lambda mb: mb["loss"], default=None)
    n = sum(len(mb["samples"]) for mb in microbatches)
    log.warning(
        "step %d: loss spike %.4E = %.1fx the median %.4E of the last %d steps (train.loss_spike_factor=%g); "
        "the step's %d samples on %d microbatches are in %s%s", step, loss, loss / reference, reference, window,
        factor, n, len(microbatches), path,
        "" if worst is None else f"; highest-loss microbatch: DP rank {worst['dp_rank']} microbatch "
        f"{worst['microbatch']} ({worst['modality']}, loss {worst['loss']:.4E}): {', '.join(worst['samples'])}")
