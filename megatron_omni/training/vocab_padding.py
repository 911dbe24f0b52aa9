"""Weights-only loads across a change of vocabulary padding.

The embedding and output layer are padded to a multiple of make_vocab_size_divisible_by * TP
(`ModelConfig.padded_vocab_size`), so a checkpoint written at TP2 (`omni-from-hf --tp 2`, or a
stage trained at TP2) may have more rows than the same model at TP1 or fewer than at TP4 (Llama-3's
128256 + the omni tokens: 132608 at TP2, 132480 at TP1), as may one written with another
make_vocab_size_divisible_by -- the same vocabulary, only the padding differs, yet
dist_checkpointing refuses the other global shape.
For a weights-only load (`train.pretrained_checkpoint`, `tools/forward.py`) those two tensors
are requested whole at the checkpoint's shape and each rank copies its own rows; rows the
checkpoint lacks (padding only) keep this model's own init.  The real vocabulary rows must be
in both: a different vocabulary stays the shape error it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor

VOCAB_TENSORS = ("word_embeddings.weight", "output_layer.weight")


@dataclass
class RepaddedTensor:
    model_key: str  # "model" or "model<i>" in the sharded state dict
    name: str  # the parameter's state-dict name
    own: ShardedTensor  # what this rank asked for before: its rows of the run's padded tensor


def request_whole_vocab_tensors(sd: Dict[str, Any], stored: Dict[str, Any], chunks: Sequence[torch.nn.Module],
                                model_keys: Sequence[str]) -> List[RepaddedTensor]:
    """Replace, in `sd`, every vocabulary tensor whose stored global shape differs from this run's
    in the padding rows only by a request for the whole stored tensor; returns what was replaced
    (for `take_own_rows`).  `stored`: the checkpoint's tensor metadata."""
    out: List[RepaddedTensor] = []
    for chunk, model_key in zip(chunks, model_keys):
        vocab = getattr(chunk, "vocab", None)  # OmniModel's OmniVocab: the real rows
        if vocab is None:
            continue
        for name, entry in list(sd[model_key].items()):
            if not (isinstance(entry, ShardedTensor) and name.endswith(VOCAB_TENSORS) and entry.key in stored):
                continue
            theirs, ours = tuple(stored[entry.key].global_shape), tuple(entry.global_shape)
            if theirs == ours or len(theirs) != len(ours) or theirs[1:] != ours[1:] or entry.prepend_axis_num:
                continue
            if min(theirs[0], ours[0]) < vocab.size:
                continue  # not a padding difference: _check_model_matches names it
            sd[model_key][name] = ShardedTensor.from_rank_offsets(
                entry.key, torch.empty(theirs, dtype=entry.data.dtype, device=entry.data.device),
                replica_id=_whole_tensor_replica_id())
            out.append(RepaddedTensor(model_key, name, entry))
    return out


def _whole_tensor_replica_id():
    """Every TP and DP rank of the stage asks for the same whole tensor: one of them is its main replica."""
    return (0, parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_data_parallel_rank(with_context_parallel=True))


def take_own_rows(loaded: Dict[str, Any], repadded: Sequence[RepaddedTensor]) -> None:
    """In `loaded`, each whole stored tensor -> this rank's rows at the run's padding (rows past the
    checkpoint's keep the model's current values)."""
    for r in repadded:
        whole = loaded[r.model_key][r.name]
        start, rows = r.own.global_offset[0], r.own.local_shape[0]
        local = r.own.data.detach().clone()
        end = min(start + rows, whole.shape[0])
        if end > start:
            local[: end - start] = whole[start:end].to(local.dtype)
        loaded[r.model_key][r.name] = local
