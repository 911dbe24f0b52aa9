"""One optimizer step through megatron's pipeline schedule.

The loss is per-token: each microbatch reports (sum of masked token losses, token
count), megatron's finalize_model_grads divides the gradients by the global token
count, and the logged loss is global sum / global count.  That is the same number at
every TP/PP/DP layout and microbatch split, which the parallel tests rely on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_omni.parallel.layout import unwrap
from megatron_omni.training.setup import TrainState

LM_LOSS = "lm loss"


def masked_token_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """megatron loss_func: returns (loss_sum, num_tokens, {name: [loss_sum, num_tokens]})."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), num_tokens.detach().float()])
    return loss_sum, num_tokens, {LM_LOSS: report}


def gpt_forward_step(data_iterator: Optional[Iterator[Dict[str, torch.Tensor]]], model: torch.nn.Module):
    """megatron forward_step_func for a text batch (tokens, labels, loss_mask, position_ids)."""
    batch = next(data_iterator) if data_iterator is not None else None
    vp_stage = unwrap(model).vp_stage
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    tokens = batch["tokens"].cuda(non_blocking=True) if first else None
    position_ids = batch["position_ids"].cuda(non_blocking=True) if first else None
    labels = batch["labels"].cuda(non_blocking=True) if last else None
    loss_mask = batch["loss_mask"].cuda(non_blocking=True) if last else None
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(masked_token_loss, loss_mask)


@dataclass
class StepResult:
    loss: float  # global mean token loss (identical on every rank)
    tokens: int  # loss-carrying tokens in the global batch
    grad_norm: Optional[float]
    update_successful: bool
    lr: float
    losses_reduced: List[Dict[str, torch.Tensor]] = field(default_factory=list)  # megatron's per-microbatch reports


def reduce_losses(losses_reduced: List[Dict[str, torch.Tensor]], name: str = LM_LOSS) -> torch.Tensor:
    """Sum (loss_sum, tokens) over microbatches and DP ranks; broadcast from the last PP stage."""
    total = torch.zeros(2, dtype=torch.float64, device=torch.cuda.current_device())
    for item in losses_reduced:
        if name in item:
            total += item[name].to(total.dtype)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    # Every rank logs the same number: take it from the last pipeline stage.
    last_rank = parallel_state.get_pipeline_model_parallel_last_rank()
    dist.broadcast(total, src=last_rank, group=parallel_state.get_pipeline_model_parallel_group())
    return total


def run_schedule(
    model: List[torch.nn.Module],
    data_iterators: List[Optional[Iterator]],
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool,
    forward_step_func=gpt_forward_step,
) -> List[Dict[str, torch.Tensor]]:
    """megatron's forward-backward schedule for this PP/VPP layout (lists only with VPP).
    `seq_length` x `micro_batch_size` is the microbatch; a model whose stages exchange another
    [sequence, batch] layout (the omni THD path: one stream of batch 1) says so by
    `pipeline_tensor_shape`, which sizes the p2p buffers."""
    shape = getattr(unwrap(model[0]), "pipeline_tensor_shape", None)
    if shape is not None:
        seq_length, micro_batch_size = shape(seq_length, micro_batch_size)
    return get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=data_iterators if len(model) > 1 else data_iterators[0],
        model=model if len(model) > 1 else model[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def train_step(
    state: TrainState,
    data_iterators: List[Optional[Iterator]],
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_step_func=gpt_forward_step,
    guard_step: Optional[int] = None,
) -> StepResult:
    """One update.  `guard_step` (the 1-based step number) turns on the non-finite guard
    (training/guards.py): a step whose loss or gradients are NaN/Inf on any rank is not applied."""
    for chunk in state.model:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    losses_reduced = run_schedule(
        state.model, data_iterators, num_microbatches=num_microbatches, seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=False, forward_step_func=forward_step_func,
    )
    lr = state.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
    if guard_step is not None:
        from megatron_omni.training.guards import inject_nonfinite, step_is_finite

        inject_nonfinite(state.model, guard_step)
        total = reduce_losses(losses_reduced)
        loss = (total[0] / total[1].clamp(min=1)).item()
        if not step_is_finite(state.model, loss):
            return StepResult(loss=loss, tokens=int(total[1].item()), grad_norm=float("nan"),
                              update_successful=False, lr=lr, losses_reduced=losses_reduced)
    # Megatron-LM's 'optimizer' timer (megatron_omni.profiling installs the timers; None = off).
    config = state.model[0].config
    timers = config.timers
    if timers is not None:
        timers("optimizer", log_level=1).start(barrier=config.barrier_with_L1_time)
    update_successful, grad_norm, _ = state.optimizer.step()
    if timers is not None:
        timers("optimizer").stop()
    if update_successful:
        state.scheduler.step(increment=1)
    if guard_step is None:
        total = reduce_losses(losses_reduced)
    return StepResult(
        loss=(total[0] / total[1].clamp(min=1)).item(),
        tokens=int(total[1].item()),
        grad_norm=None if grad_norm is None else float(grad_norm),
        update_successful=bool(update_successful),
        lr=lr,
        losses_reduced=losses_reduced,
    )
