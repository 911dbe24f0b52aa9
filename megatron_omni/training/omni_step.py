"""The omni forward step and loss, per pipeline microbatch.

Each microbatch carries one modality (paper Sec. 3.1) and a loss scale from the step plan.  The
loss is per token (megatron's `calculate_per_token_loss`: finalize_model_grads divides by the
global count of loss tokens), so scaling microbatch j of modality i by

    s_j = w_i * T / T_i        (T_i: modality i's loss tokens in the global batch, T = sum_i T_i)

makes the update the gradient of  sum_i w_i * L_i  with L_i modality i's *mean token loss* --
paper Eq. 5 / 7 -- however many microbatches or DP ranks carried each modality
(`megatron_omni.balance.loss`).  With one modality per step and w = 1, s = 1: plain mean-token loss.

Reported per microbatch (summed over microbatches and DP ranks by `reduce_losses`): the whole
loss ("lm loss"), the understanding loss L_un and the audio-generation loss L_gen_a (Fig. 4),
and the loss of the microbatch's modality ("loss/<modality>").
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Iterator

import torch

from megatron_omni.data.omni_batch import OmniMicrobatch
from megatron_omni.data.packing import packed_attention_mask
from megatron_omni.models.omni_vocab import OmniVocab
from megatron_omni.parallel.layout import unwrap
from megatron_omni.training.step import LM_LOSS

UNDERSTANDING_LOSS = "understanding loss"
AUDIO_GEN_LOSS = "audio generation loss"
MODALITY_LOSS_PREFIX = "loss/"


@dataclass
class PlannedMicrobatch:
    batch: OmniMicrobatch
    loss_scale: float = 1.0


def omni_loss(batch: OmniMicrobatch, vocab: OmniVocab, loss_scale: float, output_tensor: torch.Tensor):
    """megatron loss_func -> (scaled loss sum, token count, reports {name: [loss_sum, tokens]})."""
    losses = output_tensor.float()
    mask = batch.loss_mask.float()
    audio = vocab.is_audio_generation_target(batch.labels).float() * mask
    understanding = mask - audio
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)

    def report(weights: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.sum(losses * weights).detach(), weights.sum().detach()])

    reports = {
        LM_LOSS: report(mask),
        UNDERSTANDING_LOSS: report(understanding),
        AUDIO_GEN_LOSS: report(audio),
        MODALITY_LOSS_PREFIX + batch.modality: report(mask),
    }
    return loss_sum * loss_scale, num_tokens, reports


def omni_forward_step(data_iterator: Iterator[PlannedMicrobatch], model: torch.nn.Module):
    """megatron forward_step_func.  Every pipeline stage reads the microbatch: all need the M-RoPE
    positions and the packing mask; only the first stage uses tokens and media, the last labels."""
    planned = next(data_iterator)
    inner = unwrap(model)
    batch = planned.batch.to(torch.cuda.current_device(), non_blocking=True)
    B, S = batch.tokens.shape
    mask = packed_attention_mask(batch.cu_seqlens, B, S)
    media = {}
    if inner.pre_process:
        media = dict(pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                     pixel_values_videos=batch.pixel_values_videos, video_grid_thw=batch.video_grid_thw,
                     audio_features=batch.audio_features, audio_lengths=batch.audio_lengths)
    if inner.config.num_moe_experts:  # routing statistics per modality (Uni-MoE 2.0 style backbone)
        from megatron_omni.models.moe.stats import set_current_modality

        set_current_modality(inner, batch.modality)
    output = model(batch.tokens if inner.pre_process else None, batch.position_ids, mask,
                   labels=batch.labels if inner.post_process else None, **media)
    return output, partial(omni_loss, batch, inner.vocab, planned.loss_scale)
