"""Context-parallel token split of packed (THD) rows: the load-balanced 2*cp chunk rule.

Every packed sequence of (padded) length L, L divisible by 2*cp, is cut into 2*cp equal chunks;
CP rank r keeps chunks r and 2*cp-1-r (causal attention work is then equal on every rank).  This is
the rule of Transformer Engine's ``thd_get_partitioned_indices`` (used by megatron's
``get_batch_on_this_cp_rank`` for THD), in plain torch so it runs without TE (CPU, pip installs).
`thd_cp_split` pads the segments to that divisibility and says where each rank's tokens come from
(the omni model's CP path: models/omni.py, models/packed_attention.py).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from dataclasses import dataclass
from typing import List, Optional, Tuple

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


@dataclass
class ThdCpSplit:
    """Where CP rank `cp_rank`'s tokens of a packed stream of T tokens come from, built on the host
    once per microbatch (`thd_cp_split`).

    Segments are padded at their end to a multiple of 2*cp (the last one further, so the padded
    stream T_pad divides by `stream_multiple`); pad tokens sit after their segment's tokens, so causal
    attention never shows them to a real token, and they carry no loss.  Index T in the index
    tensors below means "a pad token" (callers append one row to the stream being indexed)."""

    cp_size: int
    cp_rank: int
    cu_seqlens_padded: Tensor  # int32 [n + 1], boundaries in the padded stream
    padded_lengths: List[int]  # per segment, multiples of 2*cp
    stream_index: Tensor  # int64 [T_pad]: padded stream position -> original token (T = pad)
    local_index: Tensor  # int64 [T_pad / cp]: this rank's tokens, in the 2*cp chunk order
    gathered_to_stream: Tensor  # int64 [T_pad]: row of the CP all-gather holding padded token p
    owned: Tensor  # bool [T]: the original tokens this rank holds (its loss tokens)

    def to(self, device) -> "ThdCpSplit":
        """The tensors the forward indexes with on `device` (the boundaries stay on the host)."""
        move = {n: getattr(self, n).to(device, non_blocking=True)
                for n in ("stream_index", "local_index", "gathered_to_stream", "owned")}
        return dataclasses.replace(self, **move)


def thd_cp_split(cu_seqlens: Tensor, cp_size: int, cp_rank: int, stream_multiple: Optional[int] = None
                 ) -> ThdCpSplit:
    """The CP split of a packed stream with segment boundaries `cu_seqlens` (host): each segment
    padded to a multiple of 2*cp, then `thd_partitioned_indices` on the padded boundaries.
    `stream_multiple` (a multiple of 2*cp, default 2*cp): what the padded stream length must divide
    by (2*cp*tp with sequence parallel, so every rank's share splits over TP)."""
    step = 2 * cp_size
    multiple = stream_multiple or step
    if multiple % step:
        raise ValueError(f"stream_multiple={multiple} must be a multiple of 2*cp={step}")
    cu = cu_seqlens.long().cpu()
    total = int(cu[-1])
    lengths = (cu[1:] - cu[:-1]).tolist()
    padded = [-(-n // step) * step for n in lengths]
    padded[-1] += -sum(padded) % multiple
    cu_padded = torch.tensor([0] + list(itertools.accumulate(padded)), dtype=torch.int32)
    stream = torch.full((int(cu_padded[-1]),), total, dtype=torch.long)
    for start, start_padded, n in zip(cu[:-1].tolist(), cu_padded[:-1].tolist(), lengths):
        stream[start_padded:start_padded + n] = torch.arange(start, start + n)
    per_rank = [thd_partitioned_indices(cu_padded, cp_size, r) for r in range(cp_size)]
    local = stream[per_rank[cp_rank]]
    owned = torch.zeros(total + 1, dtype=torch.bool)
    owned[local] = True
    return ThdCpSplit(cp_size=cp_size, cp_rank=cp_rank, cu_seqlens_padded=cu_padded, padded_lengths=padded,
                      stream_index=stream, local_index=local, gathered_to_stream=torch.cat(per_rank).argsort(),
                      owned=owned[:total])


def cp_item_range(item_tokens: List[int], cp_size: int, cp_rank: int) -> Tuple[int, int]:
    """[lo, hi): the contiguous run of media items (images / videos / clips, in microbatch order)
    CP rank `cp_rank` encodes, cut where the running token count crosses k/cp of the total, so the
    ranks' encoder work is about equal and their gathered outputs are in item order."""
    total = sum(item_tokens)
    cum = list(itertools.accumulate(item_tokens))
    bounds = [0] + [bisect.bisect_left(cum, k * total / cp_size) + (total > 0) for k in range(1, cp_size)]
    bounds = [min(b, len(item_tokens)) for b in bounds] + [len(item_tokens)]
    return bounds[cp_rank], bounds[cp_rank + 1]


def gather_cp_media_tokens(local: Tensor, item_tokens: List[int], group) -> Tensor:
    """All-gather over the CP group of each rank's encoder outputs [its items' tokens, H] ->
    [all tokens, H] in item order (differentiable: megatron's all-gather, whose backward
    reduce-scatters each rank's rows' gradients back to the rank that encoded them)."""
    from megatron.core import tensor_parallel

    cp_size = group.size()
    sizes = []
    for r in range(cp_size):
        lo, hi = cp_item_range(item_tokens, cp_size, r)
        sizes.append(sum(item_tokens[lo:hi]))
    return tensor_parallel.gather_from_sequence_parallel_region(local, True, group=group, output_split_sizes=sizes)
