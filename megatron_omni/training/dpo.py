"""Alignment-tuning loss of M2-omni (Sec. 2.2, Eq. 2): DPO + lambda * instruction tuning.

    Loss_at = L_dpo(x_chosen, x_rejected) + lambda * L_it(x_chosen, x_it),   lambda = 0.3

L_dpo is the sigmoid DPO loss of Rafailov et al., "Direct Preference Optimization: Your
Language Model is Secretly a Reward Model" (NeurIPS 2023), Eq. 7:

    L_dpo = -log sigmoid( beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))] )

with sequence log-probabilities summed over the response tokens.  The reference policy is the
same network with its LoRA adapters switched off (`models.lora.adapters_disabled`).

megatron's GPTModel, given labels, returns the per-token cross-entropy [b, s] (computed by the
vocab-parallel cross entropy, so it is the full-vocabulary value on every TP rank): the
per-token log-probability is its negative, summed per sample by `training.omni_step.pair_logprobs`.
The lambda of Eq. 2 is a loss weight: the step scales the instruction-tuning microbatches by
`dpo.it_weight` (`training/omni_data.py`, `balance/loss.py`), the preference ones by 1.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

__all__ = ["dpo_loss"]


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Sigmoid DPO loss (mean over pairs) and its metrics.

    All inputs are [b] sequence log-probabilities; the reference ones are treated as constants.
    Metrics (detached, means over the pairs): ``chosen_reward`` = beta (log pi - log pi_ref)(y_w),
    ``rejected_reward`` likewise for y_l, ``reward_margin`` = their difference, ``accuracy`` =
    fraction of pairs with chosen_reward > rejected_reward.
    """
    if beta <= 0:
        raise ValueError(f"DPO beta must be > 0, got {beta}")
    shapes = {t.shape for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)}
    if len(shapes) != 1:
        raise ValueError(f"DPO inputs must all be [batch] log-probs of the same shape, got {sorted(map(tuple, shapes))}")
    chosen = beta * (policy_chosen_logps.float() - ref_chosen_logps.detach().float())
    rejected = beta * (policy_rejected_logps.float() - ref_rejected_logps.detach().float())
    margin = chosen - rejected
    loss = -F.logsigmoid(margin).mean()
    metrics = {
        "chosen_reward": chosen.detach().mean(),
        "rejected_reward": rejected.detach().mean(),
        "reward_margin": margin.detach().mean(),
        "accuracy": (margin.detach() > 0).float().mean(),
    }
    return loss, metrics
