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

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, Iterator, Optional, Tuple

import torch

from megatron_omni.data.omni_batch import OmniMicrobatch
from megatron_omni.models.omni_vocab import OmniVocab
from megatron_omni.parallel.layout import unwrap
from megatron_omni.training.stage_inputs import stage_inputs
from megatron_omni.training.step import LM_LOSS

UNDERSTANDING_LOSS = "understanding loss"
AUDIO_GEN_LOSS = "audio generation loss"
MODALITY_LOSS_PREFIX = "loss/"


@dataclass
class PlannedMicrobatch:
    batch: OmniMicrobatch
    loss_scale: float = 1.0
    # GSPO microbatches: rollouts with their old log-probs and advantages (rl/loss.py::RolloutTargets,
    # read by the GSPO forward step, rl/forward_step.py); None otherwise
    rollout: Optional[Any] = None
    # this microbatch's tensors on the device, shared by the rank's virtual pipeline chunks
    device_cache: Dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)


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


def omni_model_forward(planned: PlannedMicrobatch, model: torch.nn.Module) -> Tuple[torch.Tensor, OmniMicrobatch]:
    """The model chunk on one planned microbatch: (its output -- per-token losses on the last stage,
    hidden states elsewhere --, the microbatch with this stage's fields on the device).  Every
    pipeline stage reads the microbatch: all need the M-RoPE positions and the packing (mask or THD
    parameters); only the first stage uses tokens and media, the last labels (`stage_inputs` moves
    just those, once per microbatch)."""
    inner = unwrap(model)
    if inner.pre_process:  # python ints counted on the host copy; a no-op when the data side did it
        planned.batch.count_placeholders(inner.vocab.placeholder_ids)
    batch, mask, packed_seq_params = stage_inputs(planned.batch, planned.device_cache, inner)
    media = batch.media_inputs() if inner.pre_process else {}
    if inner.config.num_moe_experts:  # routing statistics per modality (Uni-MoE 2.0 style backbone)
        from megatron_omni.models.moe.stats import set_current_modality

        set_current_modality(inner, batch.modality)
    output = model(batch.tokens if inner.pre_process else None, batch.position_ids, mask,
                   labels=batch.labels if inner.post_process else None, packed_seq_params=packed_seq_params,
                   **media)
    return output, batch


def omni_forward_step(data_iterator: Iterator[PlannedMicrobatch], model: torch.nn.Module):
    """megatron forward_step_func of the omni stages: the model, then `omni_loss`."""
    planned = next(data_iterator)
    output, batch = omni_model_forward(planned, model)
    return output, partial(omni_loss, batch, unwrap(model).vocab, planned.loss_scale)
