"""One forward pass of a batch through this rank's model chunks, on its training layout.

The (virtual) pipeline stages run one after the other: chunk v of pipeline rank r receives the
hidden states of chunk v of rank r-1 (chunk v-1 of the last rank when r = 0), which is exactly the
wrap-around neighbour order of megatron's inference p2p helpers (`recv_from_prev_pipeline_rank_` /
`send_to_next_pipeline_rank`), so VPP needs nothing else.  Decoding steps carry one token per row,
so there is nothing to overlap across micro-batches: the stages run back to back.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.inference.communication_utils import recv_from_prev_pipeline_rank_, send_to_next_pipeline_rank
from megatron.core.utils import get_attr_wrapped_model
from torch import Tensor

from megatron_omni.parallel.layout import unwrap

__all__ = ["pipeline_forward"]


def pipeline_forward(chunks: Sequence[torch.nn.Module], tokens: Tensor, position_ids: Optional[Tensor],
                     attention_mask: Tensor, inference_context=None, media: Optional[Dict[str, object]] = None,
                     ) -> Optional[Tensor]:
    """Logits [B, s, V_padded] (gathered over TP) on the last pipeline stage, None on the others.

    `tokens` [B, s] and `position_ids` / `attention_mask` are given on every rank (all stages need
    the positions and the mask; only the first reads the tokens).  With a static
    `inference_context` only the last position's logits are materialised (s = 1).  `media` goes to
    the first stage's `OmniModel.embed_multimodal`."""
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp_rank, pp_size = pp_group.rank(), pp_group.size()
    config = unwrap(chunks[0]).config
    batch, seq = tokens.shape
    if config.sequence_parallel:
        raise RuntimeError("pipeline_forward needs sequence parallelism off (generate switches it off)")
    output = None
    for v, chunk in enumerate(chunks):
        first = v == 0 and pp_rank == 0
        last = v == len(chunks) - 1 and pp_rank == pp_size - 1
        if not first:
            hidden = torch.empty((seq, batch, config.hidden_size), dtype=config.pipeline_dtype,
                                 device=torch.cuda.current_device())
            recv_from_prev_pipeline_rank_(hidden, pp_group)
            get_attr_wrapped_model(chunk, "set_input_tensor")(hidden)
        kwargs = dict(media or {}) if first else {}
        output = chunk(tokens if first else None, position_ids, attention_mask, inference_context=inference_context,
                       runtime_gather_output=True, **kwargs)
        if not last:
            send_to_next_pipeline_rank(output.contiguous(), pp_group)
    return output if pp_rank == pp_size - 1 else None
