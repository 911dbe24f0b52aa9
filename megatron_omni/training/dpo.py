"""Alignment-tuning loss of M2-omni (Sec. 2.2, Eq. 2): DPO + lambda * instruction tuning.

    Loss_at = L_dpo(x_chosen, x_rejected) + lambda * L_it(x_chosen, x_it),   lambda = 0.3

L_dpo is the sigmoid DPO loss of Rafailov et al., "Direct Preference Optimization: Your
Language Model is Secretly a Reward Model" (NeurIPS 2023), Eq. 7:

    L_dpo = -log sigmoid( beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))] )

with sequence log-probabilities summed over the response tokens.  The reference policy is the
same network with its LoRA adapters switched off (`models.lora.adapters_disabled`).

megatron's GPTModel, given labels, returns the per-token cross-entropy [b, s] (computed by the
vocab-parallel cross entropy, so it is the full-vocabulary value on every TP rank): the
per-token log-probability is its negative, ``sequence_logprobs(-output, loss_mask)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

__all__ = ["DPOConfig", "alignment_loss", "dpo_loss", "sequence_logprobs"]


@dataclass
class DPOConfig:
    beta: float = 0.1  # DPO temperature; not in the M2-omni paper (Rafailov et al. use 0.1-0.5)
    it_weight: float = 0.3  # lambda of Eq. 2 ("we empirically set lambda to 0.3")
    lora_fraction: float = 0.05  # "LoRA to update 5.0% of the LLM's backbone weights" (Sec. 2.2)


def sequence_logprobs(per_token_logprobs: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of the response tokens' log-probabilities per sequence: [b, s] x [b, s] -> [b]."""
    if per_token_logprobs.shape != loss_mask.shape:
        raise ValueError(f"log-probs {tuple(per_token_logprobs.shape)} and loss mask "
                         f"{tuple(loss_mask.shape)} must have the same [batch, seq] shape")
    return (per_token_logprobs.float() * loss_mask.float()).sum(dim=-1)


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


def alignment_loss(dpo: torch.Tensor, it: torch.Tensor, lam: float = 0.3) -> torch.Tensor:
    """Eq. 2: L_dpo + lambda * L_it (L_it: the instruction-tuning mean token loss)."""
    return dpo + lam * it
