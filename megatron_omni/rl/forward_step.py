"""The GSPO stage's megatron forward_step_func: the omni model on a rollout microbatch, then the
GSPO loss (`rl/loss.py`) -- or, in the forward-only log-prob passes, just the log-probs."""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Iterator

import torch

from megatron_omni.rl.loss import gspo_microbatch_loss
from megatron_omni.training.omni_step import PlannedMicrobatch, omni_model_forward


def gspo_forward_step(data_iterator: Iterator[PlannedMicrobatch], model: torch.nn.Module):
    planned = next(data_iterator)
    output, batch = omni_model_forward(planned, model)
    return output, partial(gspo_microbatch_loss, dataclasses.replace(planned, batch=batch))
