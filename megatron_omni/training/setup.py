"""Model chunks -> megatron DDP -> megatron optimizer -> OptimizerParamScheduler.

The optimizer gets per-module parameter groups through megatron's `config_overrides`
(ParamKey -> override), the hook later stages use to freeze modules and give encoders
their own learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, ParamGroupOverride
from megatron.core.transformer.module import Float16Module

from megatron_omni.config.schema import RunConfig

# A function of the run config returning megatron param-group overrides, e.g.
# {ParamKey(name="*vision_encoder*"): ParamGroupOverride(max_lr=2e-5, min_lr=2e-6)}.
ParamGroupHook = Callable[[RunConfig], Optional[Dict[ParamKey, ParamGroupOverride]]]


def params_dtype(precision: str) -> torch.dtype:
    """`train.precision`: auto = bf16 with a GPU, fp32 without (CPU has no fast bf16 GEMMs to test with)."""
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


@dataclass
class TrainState:
    """Everything a training step touches; `step`/`consumed_samples` are what a checkpoint resumes."""

    model: List[DistributedDataParallel]
    optimizer: object  # megatron MegatronOptimizer (or ChainedOptimizer)
    scheduler: OptimizerParamScheduler
    step: int = 0
    consumed_samples: int = 0
    # Per-rank data-loader position of loaders that keep more than consumed_samples (the omni
    # loader's per-modality streams); checkpointed per (pp, tp, dp) rank.
    data_state: Optional[dict] = None
    # The last train.loss_spike_window step losses: the loss-spike reference (training/loss_spikes.py).
    recent_losses: List[float] = field(default_factory=list)


def wrap_ddp(cfg: RunConfig, chunks: List[torch.nn.Module], dtype: torch.dtype) -> List[DistributedDataParallel]:
    for chunk in chunks:
        chunk.cuda(torch.cuda.current_device())
    if dtype != torch.float32:
        chunks = [Float16Module(chunk.config, chunk) for chunk in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        # fp16: an overflowing (inf/NaN) gradient is the dynamic loss scaler's business -- the
        # optimizer skips the step and halves the scale -- not a fatal error before the all-reduce.
        check_for_nan_in_grad=dtype != torch.float16,
    )
    wrapped = [
        DistributedDataParallel(
            config=chunk.config, ddp_config=ddp_config, module=chunk,
            # Only the first chunk's buckets overlap with backward (megatron's rule for VPP).
            disable_bucketing=i > 0,
        )
        for i, chunk in enumerate(chunks)
    ]
    for m in wrapped:
        m.broadcast_params()
    return wrapped


def encoder_lr_overrides(cfg: RunConfig) -> Dict[ParamKey, ParamGroupOverride]:
    """Paper Table 2 "LR of Encoders": the vision / audio encoders (not their connectors) in their
    own megatron parameter group with `optimizer.encoder_lr` / `encoder_min_lr`."""
    o = cfg.optimizer
    if cfg.omni is None or o.encoder_lr is None:
        return {}
    from megatron.core.optimizer.optimizer_config import ParamWithNamePredicate

    from megatron_omni.models.omni import module_of

    def is_encoder(param, name: str) -> bool:
        while name.startswith("module."):  # DDP / Float16Module wrappers
            name = name[len("module."):]
        return module_of(name) in ("vision_encoder", "audio_encoder")

    key = ParamKey(with_name_predicate=ParamWithNamePredicate(name="omni_encoders", fn=is_encoder))
    min_lr = o.encoder_min_lr if o.encoder_min_lr is not None else o.encoder_lr * o.min_lr / o.lr
    return {key: ParamGroupOverride(max_lr=o.encoder_lr, min_lr=min_lr)}


def build_optimizer(
    cfg: RunConfig, model: List[DistributedDataParallel], dtype: torch.dtype,
    param_group_hook: Optional[ParamGroupHook] = None,
):
    o = cfg.optimizer
    mcore_cfg = McoreOptimizerConfig(
        optimizer=o.optimizer,
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        initial_loss_scale=o.initial_loss_scale,
        loss_scale=o.loss_scale,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    overrides = dict(param_group_hook(cfg) or {}) if param_group_hook else {}
    overrides.update(encoder_lr_overrides(cfg))
    optimizer = get_megatron_optimizer(mcore_cfg, model, config_overrides=overrides or None)
    decay_steps = o.lr_decay_steps or cfg.train.steps
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if o.lr_warmup_steps else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.lr_warmup_steps,
        lr_decay_steps=max(decay_steps, o.lr_warmup_steps + 1),
        lr_decay_style=o.lr_decay_style,
        start_wd=o.start_weight_decay if o.start_weight_decay is not None else o.weight_decay,
        end_wd=o.end_weight_decay if o.end_weight_decay is not None else o.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style=o.weight_decay_incr_style,
    )
    return optimizer, scheduler


def attach_schedule_hooks(model: List[DistributedDataParallel], optimizer) -> None:
    """Wire the DDP/optimizer callbacks megatron's pipeline schedules call into."""
    config = model[0].config
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    ddp_config = model[0].ddp_config
    if ddp_config.overlap_grad_reduce:
        no_sync = [m.no_sync for m in model]
        config.no_sync_func = no_sync[0] if len(model) == 1 else no_sync
        grad_sync = [m.start_grad_sync for m in model]
        config.grad_sync_func = grad_sync[0] if len(model) == 1 else grad_sync
    if ddp_config.overlap_param_gather:
        param_sync = [m.start_param_sync for m in model]
        config.param_sync_func = param_sync[0] if len(model) == 1 else param_sync
