"""The GSPO loss of one pipeline microbatch of rollouts (the omni forward step's loss function for
`PlannedMicrobatch.rollout`, as `preference_loss` is for DPO pairs).

megatron's GPTModel, given labels, returns the per-token cross entropy [B, S] (vocab-parallel: the
full-vocabulary value on every TP rank), so log pi_theta(y_t) = -output on the positions whose
label is a response token -- the loss mask.  The old (rollout) and reference log-probs are laid
out on the same [B, S] positions.  The loss function returns the *sum* over the microbatch's
sequences with the sequence count: megatron's per-token loss path divides the gradients by the
global count, which makes the update the gradient of the mean over all sequences of the
optimizer step (`gspo_loss`), whatever the microbatch / DP split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from megatron_omni.rl.config import GSPOConfig
from megatron_omni.rl.gspo import gspo_terms
from megatron_omni.training.step import LM_LOSS

if TYPE_CHECKING:
    from megatron_omni.training.omni_step import PlannedMicrobatch

__all__ = ["GSPO_CLIP_FRACTION", "GSPO_KL", "GSPO_LOSS", "GSPO_RATIO", "GSPO_REPORTS", "LOGPROBS", "RolloutTargets",
           "gspo_microbatch_loss"]

GSPO_LOSS = "gspo loss"
GSPO_CLIP_FRACTION = "gspo clip fraction"
GSPO_KL = "gspo kl"
GSPO_RATIO = "gspo ratio"
GSPO_REPORTS = (GSPO_LOSS, GSPO_CLIP_FRACTION, GSPO_KL, GSPO_RATIO)
LOGPROBS = "logprobs"


@dataclass
class RolloutTargets:
    """What the GSPO loss of a rollout microbatch needs beyond the model's output (host tensors
    unless a forward-only pass left them on the device)."""

    old_logp: torch.Tensor  # [B, S] log pi_old of each label position (0 off the response)
    advantages: torch.Tensor  # [B]
    config: GSPOConfig
    ref_logp: Optional[torch.Tensor] = None  # [B, S] log pi_ref (KL term), None without one
    logprobs_only: bool = False  # forward-only pass: report log pi per position, no loss


def gspo_microbatch_loss(planned: "PlannedMicrobatch", output_tensor: torch.Tensor):
    """megatron loss_func -> (loss sum x scale, sequences, reports {name: [sum, sequences]})."""
    r = planned.rollout
    mask = planned.batch.loss_mask
    logp = -output_tensor.float()
    rows = torch.tensor(logp.shape[0], dtype=torch.int, device=logp.device)
    if r.logprobs_only:
        return logp.sum() * 0.0, rows, {LOGPROBS: (logp * mask).detach()}
    c = r.config
    dev = logp.device
    terms = gspo_terms(logp, r.old_logp.to(dev), r.advantages.to(dev), mask, c.eps_low, c.eps_high, c.variant,
                       ref_logp=r.ref_logp.to(dev) if r.ref_logp is not None else None, kl_coef=c.kl_coef)
    loss_sum = terms.loss.sum()
    n = torch.tensor(float(logp.shape[0]), device=dev)

    def report(values: torch.Tensor) -> torch.Tensor:
        return torch.stack([values.detach().float().sum(), n])

    reports = {LM_LOSS: report(terms.loss), GSPO_LOSS: report(terms.loss), GSPO_CLIP_FRACTION: report(terms.clipped),
               GSPO_KL: report(terms.kl), GSPO_RATIO: report(terms.ratio)}
    return loss_sum * planned.loss_scale, rows, reports
