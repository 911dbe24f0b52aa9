"""Context-parallel token split of packed (THD) rows: the load-balanced 2*cp chunk rule.

Every packed sequence of (padded) length L, L divisible by 2*cp, is cut into 2*cp equal chunks;
CP rank r keeps chunks r and 2*cp-1-r (causal attention work is then equal on every rank).  This is
the rule of Transformer Engine's ``thd_get_partitioned_indices`` (used by megatron's
``get_batch_on_this_cp_rank`` for THD), in plain torch so it runs without TE (CPU, pip installs).
"""

from __future__ import annotations

import torch
from torch import Tensor


def thd_partitioned_indices(cu_seqlens_padded: Tensor, cp_size: int, cp_rank: int) -> Tensor:
    """int64 indices into the packed token stream of the tokens CP rank `cp_rank` holds, in order
    (sequence by sequence; within a sequence chunk r, then chunk 2*cp-1-r)."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} outside [0, {cp_size})")
    cu = cu_seqlens_padded.long().cpu()
    lengths = cu[1:] - cu[:-1]
    if bool((lengths % (2 * cp_size)).any()):
        raise ValueError(f"every padded sequence length must be divisible by 2*cp={2 * cp_size}, got "
                         f"{lengths.tolist()}; pad the segments (cu_seqlens_padded) before the CP split")
    parts = []
    for start, n in zip(cu[:-1].tolist(), lengths.tolist()):
        c = n // (2 * cp_size)
        for k in (cp_rank, 2 * cp_size - 1 - cp_rank):
            parts.append(torch.arange(start + k * c, start + (k + 1) * c))
    out = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    return out.to(cu_seqlens_padded.device)
