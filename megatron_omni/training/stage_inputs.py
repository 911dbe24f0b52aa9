"""What one pipeline stage's forward needs of an omni microbatch, on the device, once per microbatch.

Every stage needs the M-RoPE positions and how packed samples attend: with the THD path
(`model.packed_attention` te / torch) megatron's `PackedSeqParams` over the microbatch's
cu_seqlens, with `dense` the block-diagonal [B, 1, S, S] mask built from them.  Only the first
stage embeds, so only it gets the tokens and the media; only the last computes the loss, so only
it gets labels and loss mask.  With context parallelism the THD parameters carry this rank's
token split (`parallel/context_parallel.py::thd_cp_split`, planned on the host) and the loss mask
keeps the tokens it holds.  The media's size metadata (``image_grid_thw``, ``video_grid_thw``,
``audio_lengths``) stays on the host: the encoders plan their work from it (patch positions,
segment lengths, valid frames, each CP rank's share) and reading it there is no device sync.  Fields a stage does not
need keep their host tensors (nothing copied).

With virtual pipeline stages every model chunk of a rank runs the same microbatch; the moved
fields and the mask / packed parameters are built by the first chunk that needs them and reused
by the others (dropped after the rank's last chunk: the autograd graph holds what backward needs).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor

from megatron_omni.data.omni_batch import OmniMicrobatch
from megatron_omni.data.packing import packed_attention_mask
from megatron_omni.models.packed_attention import thd_packed_seq_params
from megatron_omni.parallel.context_parallel import ThdCpSplit, thd_cp_split

EVERY_STAGE = ("position_ids", "cu_seqlens")
FIRST_STAGE = ("tokens", "pixel_values", "pixel_values_videos", "audio_features")
LAST_STAGE = ("labels", "loss_mask")
MASK = "attention_mask"
CP_LOSS_MASK = "cp_loss_mask"
PACKED = "packed_seq_params"


def _cp_split(batch: OmniMicrobatch, config, device) -> Optional[ThdCpSplit]:
    """This CP rank's token split of the microbatch's packed stream (None without CP), from the
    host boundaries; with sequence parallel each rank's share must also split over TP."""
    cp = config.context_parallel_size
    if cp == 1:
        return None
    multiple = 2 * cp * (config.tensor_model_parallel_size if config.sequence_parallel else 1)
    return thd_cp_split(batch.cu_seqlens, cp, parallel_state.get_context_parallel_rank(), multiple).to(device)


def stage_fields(pre_process: bool, post_process: bool) -> Tuple[str, ...]:
    return EVERY_STAGE + (FIRST_STAGE if pre_process else ()) + (LAST_STAGE if post_process else ())


def stage_inputs(batch: OmniMicrobatch, cache: Dict[str, object], model_chunk
                 ) -> Tuple[OmniMicrobatch, Optional[Tensor], Optional[PackedSeqParams]]:
    """(microbatch with this chunk's fields on the device, packed attention mask [B, 1, S, S] or
    None, THD PackedSeqParams or None) -- one of the last two, by the chunk's `packed_attention`.
    `cache` is the microbatch's per-step store (`PlannedMicrobatch.device_cache`)."""
    device = torch.cuda.current_device()
    names = [n for n in stage_fields(model_chunk.pre_process, model_chunk.post_process)
             if getattr(batch, n) is not None]
    for name in names:
        if name not in cache:
            cache[name] = getattr(batch, name).to(device, non_blocking=True)
    moved = batch.with_tensors(**{n: cache[n] for n in names})
    mask = packed = None
    if model_chunk.packed_thd:
        if PACKED not in cache:
            cache[PACKED] = thd_packed_seq_params(batch.cu_seqlens, cache["cu_seqlens"], model_chunk.packed_attention,
                                                  cp_split=_cp_split(batch, model_chunk.config, device))
        packed = cache[PACKED]
        split = packed.cp_split
        if split is not None and "loss_mask" in names:  # this rank's loss: the tokens it holds
            if CP_LOSS_MASK not in cache:
                cache[CP_LOSS_MASK] = cache["loss_mask"] * split.owned.view_as(cache["loss_mask"])
            moved = moved.with_tensors(loss_mask=cache[CP_LOSS_MASK])
    else:
        if MASK not in cache:
            B, S = batch.tokens.shape
            cache[MASK] = packed_attention_mask(cache["cu_seqlens"], B, S)
        mask = cache[MASK]
    vp, vpp = model_chunk.vp_stage, parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if vp is None or vpp is None or vp == vpp - 1:  # the rank's last chunk to run this microbatch
        cache.clear()
    return moved, mask, packed
