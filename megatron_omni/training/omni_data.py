"""Omni data for the training loop: per-step microbatch plans, iterators, loss reports, state.

Every step, the modality plan (which modality each of this DP rank's pipeline microbatches
carries, and the per-modality loss weights) comes from the scheduler; the microbatches are drawn
from the per-modality streams of the data source, their loss scales computed from the DP-global
token counts (`omni_step.plan_loss_scales`), and every model chunk of this rank gets an iterator
over the same list (all pipeline stages read the microbatch: positions and the packing mask are
needed everywhere).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_omni.config.schema import RunConfig
from megatron_omni.training.omni_step import (
    AUDIO_GEN_LOSS,
    MODALITY_LOSS_PREFIX,
    UNDERSTANDING_LOSS,
    PlannedMicrobatch,
    omni_forward_step,
    plan_loss_scales,
)
from megatron_omni.training.step import LM_LOSS

log = logging.getLogger(__name__)


@dataclass
class StepPlan:
    microbatch_modalities: List[str]
    modality_weights: Dict[str, float] = field(default_factory=dict)


class CyclicModalityPlan:
    """Every step carries the modalities in turn over its microbatches (equal share, weights 1)."""

    def __init__(self, modalities: Sequence[str], num_microbatches: int):
        self.modalities, self.num_microbatches = list(modalities), num_microbatches

    def plan(self, step: int) -> StepPlan:
        n = len(self.modalities)
        return StepPlan([self.modalities[(step * self.num_microbatches + i) % n] for i in range(self.num_microbatches)])


class OmniData:
    forward_step_func = staticmethod(omni_forward_step)

    def __init__(self, cfg: RunConfig, source, scheduler, num_chunks: int, num_microbatches: int):
        self.cfg, self.source, self.scheduler = cfg, source, scheduler
        self.num_chunks, self.num_microbatches = num_chunks, num_microbatches
        self.modalities: List[str] = list(source.modalities)

    # ---------------------------------------------------------------- per step

    def step_iterators(self, step: int) -> List[Optional[object]]:
        plan = self.scheduler.plan(step)
        if len(plan.microbatch_modalities) != self.num_microbatches:
            raise RuntimeError(f"scheduler planned {len(plan.microbatch_modalities)} microbatches, "
                               f"the step has {self.num_microbatches}")
        batches = [self.source.next_microbatch(m) for m in plan.microbatch_modalities]
        scales = plan_loss_scales(batches, plan.modality_weights, self.modalities)
        planned = [PlannedMicrobatch(b, scales.get(b.modality, 0.0)) for b in batches]
        return [iter(planned) for _ in range(self.num_chunks)]

    def report_names(self) -> List[str]:
        return [LM_LOSS, UNDERSTANDING_LOSS, AUDIO_GEN_LOSS] + [MODALITY_LOSS_PREFIX + m for m in self.modalities]

    def reduce_reports(self, losses_reduced: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """{report name: [loss_sum, tokens]} summed over microbatches and DP, identical on every rank
        (one all-reduce on the last stage + one broadcast over the pipeline)."""
        names = self.report_names()
        totals = torch.zeros(len(names), 2, dtype=torch.float64, device=torch.cuda.current_device())
        for item in losses_reduced:
            for i, name in enumerate(names):
                if name in item:
                    totals[i] += item[name].to(totals.dtype)
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            dist.all_reduce(totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        dist.broadcast(totals, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
        return {name: totals[i].cpu() for i, name in enumerate(names)}

    def step_metrics(self, losses_reduced: List[Dict[str, torch.Tensor]]) -> Dict[str, object]:
        totals = self.reduce_reports(losses_reduced)

        def mean(t):
            return float(t[0] / t[1]) if float(t[1]) > 0 else None

        losses = {name[len(MODALITY_LOSS_PREFIX):]: mean(t) for name, t in totals.items()
                  if name.startswith(MODALITY_LOSS_PREFIX) and float(t[1]) > 0}
        return {"losses": losses, "understanding_loss": mean(totals[UNDERSTANDING_LOSS]),
                "audio_gen_loss": mean(totals[AUDIO_GEN_LOSS]),
                "skipped_samples": self.skipped_samples()}

    def skipped_samples(self) -> int:
        """Cumulative over the data-parallel group (every rank of a DP replica reads the same data)."""
        n = torch.tensor([float(getattr(self.source, "skipped_samples", 0))], device=torch.cuda.current_device())
        dist.all_reduce(n, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        return int(n.item())

    # ---------------------------------------------------------------- checkpoint

    def state_dict(self) -> dict:
        return {"source": self.source.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state["source"])


def build_omni_data(cfg: RunConfig, vocab, num_chunks: int, num_microbatches: int) -> OmniData:
    dp_rank = parallel_state.get_data_parallel_rank()
    if cfg.data.mock:
        from megatron_omni.data.mock_omni import MockOmniData

        source = MockOmniData(cfg.omni, vocab, seq_length=cfg.data.seq_length,
                              micro_batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed, dp_rank=dp_rank)
        log.info("omni data: mock microbatches (data.mock=true), modalities %s", ", ".join(source.modalities))
    else:
        raise NotImplementedError("omni data from manifests: set data.mock=true until the omni loader is wired")
    scheduler = CyclicModalityPlan(source.modalities, num_microbatches)
    return OmniData(cfg, source, scheduler, num_chunks, num_microbatches)
