"""Group-normalised advantages (GRPO, Shao et al. 2024 Sec. 4.1.2; GSPO, Zheng et al. 2025 Eq. 6):

    A_i = (r_i - mean({r_j}_{j=1..G})) / (std({r_j}_{j=1..G}) + eps)

over the G rollouts of one prompt.  Which std: the *sample* std (Bessel, divide by G - 1) by
default, because that is what the reference implementations compute (verl's
``compute_grpo_outcome_advantage`` and TRL's ``GRPOTrainer`` call ``torch.std``, unbiased), so
advantages here match theirs number for number; ``std="population"`` (divide by G) is the other
reading of the papers' std({r}).  A group whose rewards are all equal carries no signal: its
advantages are exactly 0 (numerator 0), whatever eps.
"""

from __future__ import annotations

import torch

__all__ = ["STD_KINDS", "group_advantages"]

STD_KINDS = ("sample", "population")


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6, std: str = "sample") -> torch.Tensor:
    """[N] rewards, N = prompts x G with each prompt's G rollouts adjacent -> [N] advantages."""
    if std not in STD_KINDS:
        raise ValueError(f"advantage std {std!r}; use one of {', '.join(STD_KINDS)}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D [prompts * G] tensor, got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group-normalised advantages need G >= 2 rollouts per prompt, got G = {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards are not a whole number of groups of G = {group_size}")
    groups = rewards.reshape(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    spread = groups.std(dim=1, keepdim=True, correction=1 if std == "sample" else 0)
    return (centred / (spread + eps)).reshape(-1)
