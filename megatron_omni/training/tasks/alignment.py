"""`AlignmentTask`: alignment tuning of M2-omni (Sec. 2.2, Eq. 2) as a variant of the omni task.

    Loss_at = L_dpo(x_chosen, x_rejected) + lambda * L_it(x_chosen, x_it),   lambda = dpo.it_weight

The same omni model and data plan, with a "preference" stream among the modalities: each of its
rows packs a chosen and a rejected sample of one prompt (`data/preference_stream.py`).  What
differs from `OmniTask`:

* its loss units are pairs (L_dpo is a mean over the global batch's pairs), not target tokens;
* Eq. 2's weights: 1 for the pairs, lambda x w_i for every other modality;
* before the schedule, a forward-only pass with the LoRA adapters off (the reference policy, no
  second copy of the model) gives each pair's reference log-probs;
* the forward step computes L_dpo on the pairs (`preference_loss`) and the omni LM loss elsewhere;
* the metrics row adds `dpo_loss` and `dpo_accuracy`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Dict, Iterator, List, Optional

import torch
from megatron.core import parallel_state

from megatron_omni.config.schema import DPOConfig
from megatron_omni.data.omni_batch import OmniMicrobatch
from megatron_omni.data.preference_stream import PREFERENCE
from megatron_omni.models.lora import adapters_disabled
from megatron_omni.parallel.layout import unwrap
from megatron_omni.training.dpo import dpo_loss
from megatron_omni.training.omni_data import OmniData, build_omni_data, report_mean
from megatron_omni.training.omni_step import MODALITY_LOSS_PREFIX, PlannedMicrobatch, omni_loss, omni_model_forward
from megatron_omni.training.setup import TrainState
from megatron_omni.training.step import run_schedule
from megatron_omni.training.tasks.base import num_microbatches
from megatron_omni.training.tasks.omni import OmniTask

DPO_LOSS = "dpo loss"
DPO_ACCURACY = "dpo accuracy"


@dataclass
class PlannedPair(PlannedMicrobatch):
    """A planned microbatch of the alignment stage (pairs or, for the other modalities, LM rows)."""

    # preference rows: the reference policy's (chosen, rejected) sequence log-probs per row, [B, 2],
    # on the last pipeline stage; None in the reference pass itself
    ref_logps: Optional[torch.Tensor] = None
    dpo_beta: float = 0.1


def pair_logprobs(batch: OmniMicrobatch, per_token_loss: torch.Tensor) -> torch.Tensor:
    """[B, 2] sequence log-probs of (chosen, rejected): each row of a preference microbatch holds
    the chosen sample, then the rejected one, as its first two segments (data/preference_stream.py)."""
    seg = batch.segment_ids()
    local = seg - seg[:, :1]  # 0 = chosen, 1 = rejected, 2 = padding
    logp = -per_token_loss.float() * batch.loss_mask.float()
    return torch.stack([(logp * (local == 0)).sum(-1), (logp * (local == 1)).sum(-1)], dim=-1)


def preference_loss(planned: PlannedPair, output_tensor: torch.Tensor):
    """L_dpo of paper Eq. 2 summed over the microbatch's pairs (the step's loss scaling turns the
    sum into the mean over all pairs of the global batch); without reference log-probs this is
    the reference pass and only reports them."""
    logps = pair_logprobs(planned.batch, output_tensor)
    pairs = torch.tensor(logps.shape[0], dtype=torch.int, device=logps.device)
    if planned.ref_logps is None:
        return logps.sum() * 0.0, pairs, {"ref_logps": logps.detach()}
    ref = planned.ref_logps.to(logps.device)
    loss, metrics = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], planned.dpo_beta)
    n = float(logps.shape[0])
    loss_sum = loss * n
    reports = {
        DPO_LOSS: torch.stack([loss_sum.detach(), torch.tensor(n, device=loss.device)]),
        MODALITY_LOSS_PREFIX + PREFERENCE: torch.stack([loss_sum.detach(), torch.tensor(n, device=loss.device)]),
        DPO_ACCURACY: torch.stack([metrics["accuracy"] * n, torch.tensor(n, device=loss.device)]),
    }
    return loss_sum * planned.loss_scale, pairs, reports


def alignment_forward_step(data_iterator: Iterator[PlannedPair], model: torch.nn.Module):
    """megatron forward_step_func: the omni model, then L_dpo on pairs, the omni LM loss elsewhere."""
    planned = next(data_iterator)
    output, batch = omni_model_forward(planned, model)
    if batch.modality == PREFERENCE:
        return output, partial(preference_loss, dataclasses.replace(planned, batch=batch))
    return output, partial(omni_loss, batch, unwrap(model).vocab, planned.loss_scale)


class AlignmentData(OmniData):
    forward_step_func = staticmethod(alignment_forward_step)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dpo: DPOConfig = self.cfg.dpo or DPOConfig()

    def _loss_units(self, batch: OmniMicrobatch) -> torch.Tensor:
        return torch.ones(batch.tokens.shape[0]) if batch.modality == PREFERENCE else batch.loss_mask

    def _planned(self, batch: OmniMicrobatch, loss_scale: float) -> PlannedPair:
        return PlannedPair(batch, loss_scale, dpo_beta=self.dpo.beta)

    def _effective_weights(self, planned: Dict[str, float]) -> Dict[str, float]:
        """Eq. 2: L_dpo + lambda * (each modality's w_i L_i)."""
        weights = super()._effective_weights(planned)
        return {m: w if m == PREFERENCE else w * self.dpo.it_weight for m, w in weights.items()}

    @torch.no_grad()
    def _before_step(self, model: Optional[list], planned: List[PlannedPair]) -> None:
        """DPO reference log-probs (Eq. 2): the same model with its LoRA adapters off in a
        forward-only pass over the step's preference microbatches; the last pipeline stage keeps
        them on the microbatches for the training pass."""
        pairs = [p for p in planned if p.batch.modality == PREFERENCE]
        if not pairs:
            return
        items = [PlannedPair(p.batch, 0.0) for p in pairs]
        with adapters_disabled(model):
            reports = run_schedule(model, [iter(items) for _ in range(self.num_chunks)], num_microbatches=len(items),
                                   seq_length=self.cfg.data.seq_length,
                                   micro_batch_size=self.cfg.train.micro_batch_size, forward_only=True,
                                   forward_step_func=self.forward_step_func)
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            for p, report in zip(pairs, reports):
                p.ref_logps = report["ref_logps"]

    def report_names(self) -> List[str]:
        return super().report_names() + [DPO_LOSS, DPO_ACCURACY]

    def _metrics(self, totals: Dict[str, torch.Tensor]) -> Dict[str, object]:
        row = super()._metrics(totals)
        if PREFERENCE in self.modalities:
            row.update(dpo_loss=report_mean(totals[DPO_LOSS]), dpo_accuracy=report_mean(totals[DPO_ACCURACY]))
        return row


class AlignmentTask(OmniTask):
    forward_step_func = staticmethod(alignment_forward_step)

    def build_data(self, state: TrainState) -> None:
        self.data = build_omni_data(self.cfg, unwrap(state.model[0]).vocab, len(state.model),
                                    num_microbatches(self.cfg), data_type=AlignmentData)
