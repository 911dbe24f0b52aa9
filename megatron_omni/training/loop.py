"""The pretraining loop: build, (resume,) step, log, checkpoint, stop on schedule or SIGTERM."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.distributed as dist

from megatron_omni.config import ConfigError, RunConfig, data_parallel_size, dump_config, validate
from megatron_omni.models.init import init_weights_layout_invariant
from megatron_omni.models.llama import build_llama_chunks
from megatron_omni.models.moe.stats import collect_routing_stats, set_routing_stats_enabled
from megatron_omni.parallel.initialize import initialize_distributed, set_random_seeds
from megatron_omni.parallel.layout import unwrap
from megatron_omni.training import flops
from megatron_omni.training.checkpoint import check_overwrite, load_checkpoint, loaded_path, save_checkpoint
from megatron_omni.training.guards import NonFiniteError, NonFiniteGuard, disable_ddp_nan_check
from megatron_omni.training.fault_injection import maybe_inject, spiked_forward_step
from megatron_omni.training.loss_spikes import (
    LossSpikeDetector,
    drop_records_after,
    gather_step_microbatches,
    nonfinite_detail,
    record_spike,
)
from megatron_omni.training.metrics import MetricsWriter, progress_line, timers_line
from megatron_omni.training.preemption import PreemptionHandler
from megatron_omni.training.pretrained_config import check_converted_architecture
from megatron_omni.training.setup import (
    ParamGroupHook,
    TrainState,
    attach_schedule_hooks,
    build_optimizer,
    params_dtype,
    wrap_ddp,
)
from megatron_omni.training.step import gpt_forward_step, reduce_losses, run_schedule, train_step
from megatron_omni.training.text_data import build_text_data, chunk_iterators

if TYPE_CHECKING:
    from megatron_omni.profiling import StepProfiler

COMPLETE_MARKER = "training_complete.json"
log = logging.getLogger("megatron_omni.train")


def checkpoints_root(cfg: RunConfig) -> str:
    return os.path.join(cfg.train.output_dir, "checkpoints")


def build_train_state(cfg: RunConfig, param_group_hook: Optional[ParamGroupHook] = None) -> TrainState:
    """Parallel groups, model, DDP, optimizer and scheduler for `cfg` (no data, no resume)."""
    initialize_distributed(cfg.parallel)
    validate(cfg, dist.get_world_size())
    set_random_seeds(cfg.train.seed)
    dtype = params_dtype(cfg.train.precision)
    if cfg.omni is not None:
        from megatron_omni.models import omni

        chunks = omni.build_omni_chunks(cfg.model, cfg.parallel, cfg.omni, seq_length=cfg.data.seq_length,
                                        params_dtype=dtype)
        omni.init_omni_weights_layout_invariant(chunks, cfg.model, cfg.omni, cfg.train.seed)
        trainable = omni.apply_freeze(chunks, cfg.omni.freeze)
        log.info("omni model: trainable parameters on this rank %s; frozen: %s",
                 {k: v for k, v in trainable.items() if v}, cfg.omni.freeze or "none")
    else:
        chunks = build_llama_chunks(cfg.model, cfg.parallel, seq_length=cfg.data.seq_length, params_dtype=dtype)
        init_weights_layout_invariant(chunks, cfg.model, cfg.train.seed)
    if cfg.lora is not None:
        apply_lora_from_config(chunks, cfg)
    model = wrap_ddp(cfg, chunks, dtype)
    optimizer, scheduler = build_optimizer(cfg, model, dtype, param_group_hook)
    attach_schedule_hooks(model, optimizer)
    return TrainState(model=model, optimizer=optimizer, scheduler=scheduler)


def apply_lora_from_config(chunks, cfg: RunConfig) -> None:
    """LoRA on the backbone's decoder layers only (the encoders and connectors stay frozen or not
    as `omni.freeze` says); every other backbone weight is frozen."""
    from megatron_omni.models.lora import apply_lora, lora_rank_for_fraction

    lo = cfg.lora
    rank = lo.rank or lora_rank_for_fraction(cfg.model, lo.fraction)
    apply_lora(chunks, tuple(lo.targets), rank=rank, alpha=lo.alpha or float(rank), dropout=lo.dropout,
               seed=cfg.train.seed, within="decoder.")


def is_logging_step(t, step: int) -> bool:
    """Step `step` (1-based) prints a progress line and collects the MoE routing statistics."""
    return step % t.log_interval == 0 or step == t.steps


def num_microbatches(cfg: RunConfig) -> int:
    dp = data_parallel_size(cfg, dist.get_world_size())
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)


@torch.no_grad()
def evaluate(cfg: RunConfig, state: TrainState, dataset, forward_step_func=gpt_forward_step) -> float:
    """Mean token loss over the first eval_iters global batches of the validation split."""
    for chunk in state.model:
        chunk.eval()
    iterators = chunk_iterators(cfg, dataset, len(state.model), consumed_samples=0)
    summed = torch.zeros(2, dtype=torch.float64)
    for _ in range(cfg.train.eval_iters):
        losses = run_schedule(
            state.model, iterators, num_microbatches=num_microbatches(cfg), seq_length=cfg.data.seq_length,
            micro_batch_size=cfg.train.micro_batch_size, forward_only=True, forward_step_func=forward_step_func,
        )
        summed += reduce_losses(losses).cpu()
    for chunk in state.model:
        chunk.train()
    return (summed[0] / summed[1].clamp(min=1)).item()


def pretrain(
    cfg: RunConfig,
    *,
    forward_step_func: Callable = gpt_forward_step,
    param_group_hook: Optional[ParamGroupHook] = None,
    profiler: Optional["StepProfiler"] = None,
) -> TrainState:
    """Train `cfg.train.steps` steps.

    `profiler` (megatron_omni.profiling.StepProfiler) switches on megatron timers (rows of
    metrics.jsonl then carry `timers`: ms per timer, max over ranks) and an optional
    torch.profiler window; without one, `train.timing_log_level` turns on the timers alone.
    Without either, nothing is timed beyond the step wall time and rows keep their default keys.
    """
    if profiler is None and cfg.train.timing_log_level is not None:
        from megatron_omni.profiling.profiler import StepProfiler, options_for_training

        profiler = StepProfiler(options_for_training(cfg.train.timing_log_level))
    state = build_train_state(cfg, param_group_hook)
    t = cfg.train
    is_logger = dist.get_rank() == 0
    root = checkpoints_root(cfg)
    if is_logger:
        os.makedirs(t.output_dir, exist_ok=True)
        dump_config(cfg, os.path.join(t.output_dir, "config.yaml"))
    omni_data = None
    if cfg.omni is not None and cfg.gspo is not None:  # the RL stage: rollouts + GSPO updates (rl/stage.py)
        from megatron_omni.rl.stage import build_gspo_data

        omni_data = build_gspo_data(cfg, unwrap(state.model[0]).vocab, len(state.model), num_microbatches(cfg))
        state.data_state = omni_data.state_dict()
    elif cfg.omni is not None:
        from megatron_omni.training.omni_data import build_omni_data

        omni_data = build_omni_data(cfg, unwrap(state.model[0]).vocab, len(state.model), num_microbatches(cfg))
        state.data_state = omni_data.state_dict()  # asks the checkpoint for this rank's loader state
    check_overwrite(root, t.load, t.allow_overwrite)
    schedule = cfg.optimizer.resume_schedule
    resumed = load_checkpoint(state, t.load, finetune=t.finetune, schedule=schedule) is not None if t.load else False
    loaded = loaded_path(t.load, state.step) if resumed else None  # never pruned by this run
    if is_logger and state.step < t.steps and os.path.exists(os.path.join(t.output_dir, COMPLETE_MARKER)):
        # an earlier run's marker: this run trains further, so it is not complete until it ends
        os.remove(os.path.join(t.output_dir, COMPLETE_MARKER))
        log.info("removed %s of an earlier run (this run trains steps %d..%d)", COMPLETE_MARKER, state.step + 1, t.steps)
    if not resumed and t.pretrained_checkpoint:
        # weights only: a new stage of the recipe starts from the previous one's last checkpoint
        check_converted_architecture(cfg, t.pretrained_checkpoint)
        if load_checkpoint(state, t.pretrained_checkpoint, finetune=True) is None:
            raise ConfigError(f"train.pretrained_checkpoint={t.pretrained_checkpoint} holds no checkpoint; "
                              "run the previous stage first (or drop pretrained_checkpoint to start from scratch)")
    if omni_data is not None:
        if state.step > 0:
            omni_data.load_state_dict(state.data_state)
        data, iterators = None, None
    else:
        data = build_text_data(cfg)
        iterators = data.train_iterators(cfg, len(state.model), state.consumed_samples)
    metrics = MetricsWriter(t.output_dir, enabled=is_logger, tensorboard=t.tensorboard, start_step=state.step)
    preemption = PreemptionHandler()
    guard = NonFiniteGuard(t.skip_nonfinite_steps)
    spikes = LossSpikeDetector(t.loss_spike_factor, t.loss_spike_window, state.recent_losses) \
        if t.loss_spike_factor is not None else None
    if is_logger:  # spikes a crashed attempt logged past the checkpoint are logged again below
        drop_records_after(t.output_dir, state.step)
    if guard.enabled:
        disable_ddp_nan_check(state.model)

    world = dist.get_world_size()
    # A frozen omni LLM (omni.freeze) runs no weight-gradient GEMMs.
    step_flops = flops.llm_flops_per_step(cfg.model, t.global_batch_size, cfg.data.seq_length, tp=cfg.parallel.tp,
                                          weight_grads=cfg.omni is None or "llm" not in cfg.omni.freeze)
    device = flops.detect_device()
    precision = "fp8" if cfg.model.fp8 else {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[
        params_dtype(t.precision)]
    if profiler is not None:
        profiler.attach(cfg, state, meta=dict(
            world=world, tp=cfg.parallel.tp, pp=cfg.parallel.pp, vpp=cfg.parallel.vpp, cp=cfg.parallel.cp,
            dp=data_parallel_size(cfg, world), num_microbatches=num_microbatches(cfg),
            micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size,
            seq_length=cfg.data.seq_length, flops_per_step=step_flops, device=device, precision=precision,
        ))
        if iterators is not None:
            iterators = profiler.wrap_iterators(iterators)
        if omni_data is not None:  # the omni step fetches its microbatches before the schedule
            omni_data.source = profiler.wrap_source(omni_data.source)
    log.info(
        "training %d steps | world %d = tp %d x pp %d x cp %d x dp %d | %d microbatches/step | %.3e FLOPs/step",
        t.steps, world, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp,
        data_parallel_size(cfg, world), num_microbatches(cfg), step_flops,
    )

    def step_samples():  # (modality, sample ids) of this DP rank's microbatches of the step just run
        return omni_data.step_samples() if omni_data is not None else \
            data.step_samples(cfg, state.consumed_samples - t.global_batch_size, num_microbatches(cfg))

    run_start, steps_run = time.time(), 0
    while state.step < t.steps:
        if profiler is not None:
            profiler.step_begin(state.step + 1)
        start = time.time()
        maybe_inject("step", state.step + 1)  # tests/faults/ only: inert without $MEGATRON_OMNI_INJECT_FAULT
        logging_step = is_logging_step(t, state.step + 1)
        if cfg.model.moe is not None:  # routing statistics (host reads) on logging steps only
            set_routing_stats_enabled(state.model, logging_step)
        step_iterators, step_forward = iterators, forward_step_func
        if omni_data is not None:
            step_iterators, step_forward = omni_data.step_iterators(state.step, state.model), omni_data.forward_step_func
            if profiler is not None:
                step_iterators = profiler.wrap_iterators(step_iterators)
        step_forward = spiked_forward_step(step_forward, state.step + 1)  # tests/faults/ only, like maybe_inject
        result = train_step(
            state, step_iterators, num_microbatches=num_microbatches(cfg), seq_length=cfg.data.seq_length,
            micro_batch_size=t.micro_batch_size, forward_step_func=step_forward,
            guard_step=state.step + 1 if guard.enabled else None,
        )
        step_time = time.time() - start
        state.step += 1
        state.consumed_samples += t.global_batch_size
        steps_run += 1
        tokens_per_s = t.global_batch_size * cfg.data.seq_length / step_time
        omni_row = omni_data.step_metrics(result.losses_reduced) if omni_data is not None else {}  # collective
        # the omni step's FLOPs add its encoders' work on this step's media
        tflops = (step_flops + omni_row.get("encoder_flops", 0.0)) / step_time / world / 1e12
        row = {
            "step": state.step, "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
            "tokens": result.tokens, "step_time_s": step_time, "tokens_per_s": tokens_per_s,
            "tflops_per_gpu": tflops, "mfu": flops.mfu(tflops, device, precision),
            "consumed_samples": state.consumed_samples,
        }
        nonfinite = result.grad_norm is not None and not math.isfinite(result.grad_norm)
        if nonfinite:
            row["skipped_update"] = True
        # a skipped step names its microbatches with a non-finite loss (collective, on such steps only)
        diverged = guard.record(state.step, not nonfinite, nonfinite_detail(gather_step_microbatches(
            step_samples(), result.losses_reduced)) if nonfinite else "") if guard.enabled else None
        if omni_data is not None:
            row.update(omni_row)
            row["tokens_per_s_by_modality"] = {m: n / step_time for m, n in omni_data.tokens_per_modality().items()}
            row["modality_weights"] = omni_data.modality_weights(state.step - 1)
            if t.eval_interval and state.step % t.eval_interval == 0:
                row["val_losses"] = omni_data.validation_losses(state.model, run_schedule)
                new_weights = omni_data.update_balance(row["val_losses"])
                if new_weights is not None:
                    row["adaptive_weights"] = new_weights
        reference = spikes.check(result.loss) if spikes is not None and not nonfinite else None
        if reference is not None:  # collective, entered by every rank: all hold the same loss
            record_spike(t.output_dir, step=state.step, loss=result.loss, reference=reference,
                         factor=t.loss_spike_factor, window=t.loss_spike_window, samples=step_samples(),
                         losses_reduced=result.losses_reduced, modality_losses=row.get("losses"))
            row["loss_spike_reference"] = reference
        if cfg.model.moe is not None and logging_step:
            row["moe"] = collect_routing_stats(state.model)  # collective: every rank takes part
        if profiler is not None:
            row["timers"] = profiler.step_end(state.step, row)  # collective: every rank takes part
        if t.eval_interval and state.step % t.eval_interval == 0 and data is not None and data.valid is not None:
            row["val_loss"] = evaluate(cfg, state, data.valid, forward_step_func)
        if is_logger:
            metrics.write(row)
            if logging_step:
                eta = (time.time() - run_start) / steps_run * (t.steps - state.step)
                log.info(progress_line(
                    step=state.step, total=t.steps, loss=result.loss, lr=result.lr, grad_norm=result.grad_norm,
                    step_time_s=step_time, tokens_per_s=tokens_per_s, tflops_per_gpu=tflops, mfu=row["mfu"],
                    consumed_samples=state.consumed_samples, eta_s=eta,
                ) + (f" | val loss: {row['val_loss']:.6E}" if "val_loss" in row else "")
                  + "".join(f" | {m} loss: {v:.4E}" for m, v in row.get("losses", {}).items())
                  + (f" | skipped samples: {row['skipped_samples']}" if row.get("skipped_samples") else ""))
                if row.get("timers"):
                    log.info(timers_line(row["timers"]))
        stop = preemption.should_stop()
        exiting = stop or diverged is not None or (t.exit_interval is not None and state.step >= t.exit_interval)
        saving = profiler is None or profiler.save_checkpoints
        if saving and ((t.save_interval and state.step % t.save_interval == 0) or exiting or state.step == t.steps):
            if omni_data is not None:
                omni_data.before_checkpoint()
                state.data_state = omni_data.state_dict()
            save_checkpoint(state, root, keep_last=t.keep_last_checkpoints,
                            optimizer_sharding=t.ckpt_optimizer_sharding, protect=loaded)
            log.info("saved checkpoint at step %d to %s", state.step, root)
        if diverged is not None:
            metrics.close()
            raise NonFiniteError(diverged)
        if exiting:
            log.info("exiting after step %d (%s)", state.step, "SIGTERM" if stop else "train.exit_interval")
            break
    if profiler is not None:
        profiler.close()
    preemption.restore()
    metrics.close()
    if is_logger and state.step >= t.steps:
        # Launchers tell "done" from "stopped early with a checkpoint" (both exit 0) by this file:
        # examples/slurm_train.sbatch requeues until it exists.
        with open(os.path.join(t.output_dir, COMPLETE_MARKER), "w") as f:
            json.dump({"step": state.step, "steps": t.steps}, f)
    return state
