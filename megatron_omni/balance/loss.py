"""The weighted multi-modality objective of one update, and how megatron's schedule realises it.

Objective (Eq. 5 / 7 with weights, Alg. 1 lines 11-15): over everything the update saw,
summed over microbatches and DP ranks,

    J = sum_i w_i * L_i,    L_i = (sum_{mb in i} loss_sum_mb) / T_i

where L_i is modality i's *mean token loss* and T_i its loss-carrying token count (global).
A modality weighs w_i however many microbatches or DP ranks carried it.

megatron with ``calculate_per_token_loss=True`` sums each loss_func's ``num_tokens`` over
microbatches and DP(+CP) ranks into T = sum_i T_i and multiplies every gradient by 1/T in
``finalize_model_grads``.  Scaling microbatch mb of modality i by

    s_i = w_i * T / T_i                    (`microbatch_loss_scale`)

before backward (keeping ``num_tokens`` the true count) gives gradients
(1/T) * sum_mb s_i * grad(loss_sum_mb) = sum_i w_i grad(L_i) = grad J.

The scale needs the global T_i *before* backward: the training step reads them from the
loss masks of its microbatches (`local_modality_tokens`; the last pipeline stage holds the
masks), and all-reduces them over the same group megatron reduces ``num_tokens`` over
(`all_reduce_modality_tokens`, the DP x CP group).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_modality_tokens",
    "local_modality_tokens",
    "microbatch_loss_scale",
]


def local_modality_tokens(modalities: Sequence[str], loss_masks: Sequence[torch.Tensor],
                          all_modalities: Sequence[str]) -> Dict[str, int]:
    """Loss-carrying tokens per modality over this rank's microbatches (mask sums).

    Args:
        modalities: the plan's modality of each microbatch.
        loss_masks: each microbatch's loss mask (any shape; 1 = the token has a target).
        all_modalities: every configured modality (absent ones count 0), fixing the key set.
    """
    if len(modalities) != len(loss_masks):
        raise ValueError(f"{len(modalities)} microbatch modalities but {len(loss_masks)} loss masks")
    counts = {m: 0 for m in all_modalities}
    for k, (m, mask) in enumerate(zip(modalities, loss_masks)):
        if m not in counts:
            raise ValueError(f"microbatch {k} has modality {m!r}, not one of {list(all_modalities)}")
        counts[m] += int(mask.sum().item())
    return counts


def all_reduce_modality_tokens(local: Mapping[str, int], group: Optional[dist.ProcessGroup]) -> Dict[str, int]:
    """Sum per-modality token counts over `group` (pass megatron's DP group with context parallel)."""
    names = list(local)  # every rank builds the dict from the same config order
    counts = torch.tensor([int(local[m]) for m in names], dtype=torch.int64,
                          device=torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(counts, group=group)
    return {m: int(c) for m, c in zip(names, counts.tolist())}


def microbatch_loss_scale(modality: str, global_tokens: Mapping[str, int], weights: Mapping[str, float]) -> float:
    """s_i = w_i * T / T_i: multiply a modality-i microbatch's loss sum by this before backward.

    ``global_tokens`` are the update's per-modality token counts over all microbatches and DP
    ranks; T is their sum.  A modality with no tokens contributes no loss (scale 0).
    """
    t_i = int(global_tokens[modality])
    if t_i <= 0:
        return 0.0
    total = sum(int(v) for v in global_tokens.values())
    return float(weights[modality]) * total / t_i
