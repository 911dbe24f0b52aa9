"""The training loop: build, (resume,) step, log, checkpoint, stop on schedule or SIGTERM.

What is trained -- the model, its data, the forward step and loss, the task's metrics and its
validation -- is the `Task`'s (`training/tasks/`: text, omni, alignment, GSPO); this loop is the same for
every task.  A profiler (`megatron_omni.profiling.StepProfiler`, built by the caller) times it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Dict, Optional, Protocol

import torch
import torch.distributed as dist

from megatron_omni.config import ConfigError, RunConfig, data_parallel_size, dump_config, validate
from megatron_omni.models.moe.stats import collect_routing_stats, set_routing_stats_enabled
from megatron_omni.parallel.initialize import initialize_distributed, set_random_seeds
from megatron_omni.training import flops
from megatron_omni.training.checkpoint import check_overwrite, load_checkpoint, loaded_path, save_checkpoint
from megatron_omni.training.fault_injection import maybe_inject, spiked_forward_step
from megatron_omni.training.guards import NonFiniteError, NonFiniteGuard, disable_ddp_nan_check
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
from megatron_omni.training.step import train_step
from megatron_omni.training.tasks import Task, num_microbatches, task_for

COMPLETE_MARKER = "training_complete.json"
log = logging.getLogger("megatron_omni.train")


class Profiler(Protocol):
    """What the loop calls on a profiler (`megatron_omni.profiling.StepProfiler` implements it)."""

    save_checkpoints: bool  # profiling runs usually skip checkpoint writes

    def attach(self, cfg: RunConfig, state: TrainState, meta: Dict[str, Any]) -> None: ...

    def wrap_task(self, task: Task) -> Task: ...  # the same task, its data reads timed

    def step_begin(self, step: int) -> None: ...

    def step_end(self, step: int, row: Dict[str, Any]) -> Dict[str, float]: ...  # timers, max over ranks

    def close(self) -> None: ...


def checkpoints_root(cfg: RunConfig) -> str:
    return os.path.join(cfg.train.output_dir, "checkpoints")


def build_train_state(cfg: RunConfig, param_group_hook: Optional[ParamGroupHook] = None,
                      task: Optional[Task] = None) -> TrainState:
    """Parallel groups, the task's model (`task_for(cfg)` by default), DDP, optimizer and scheduler
    for `cfg` (no data, no resume)."""
    initialize_distributed(cfg.parallel)
    validate(cfg, dist.get_world_size())
    set_random_seeds(cfg.train.seed)
    dtype = params_dtype(cfg.train.precision)
    chunks = (task or task_for(cfg)).build_model(dtype)
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


def run_meta(cfg: RunConfig, task: Task) -> Dict[str, Any]:
    """The run's layout, batch and FLOPs: the training log's first line, the profiler's report
    header, and what TFLOP/s and MFU are computed from."""
    world, p, t = dist.get_world_size(), cfg.parallel, cfg.train
    precision = "fp8" if cfg.model.fp8 else {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[
        params_dtype(t.precision)]
    return dict(world=world, tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, dp=data_parallel_size(cfg, world),
                num_microbatches=num_microbatches(cfg), micro_batch_size=t.micro_batch_size,
                global_batch_size=t.global_batch_size, seq_length=cfg.data.seq_length,
                flops_per_step=task.llm_flops_per_step(), device=flops.detect_device(), precision=precision)


def resume(cfg: RunConfig, state: TrainState) -> Optional[str]:
    """Load `train.load` (this run, resumed), else `train.pretrained_checkpoint` (weights only: a
    new stage of the recipe starts from the previous one's last checkpoint).  Returns the resumed
    checkpoint's folder, which this run never prunes, or None."""
    t = cfg.train
    resumed = t.load and load_checkpoint(state, t.load, finetune=t.finetune,
                                         schedule=cfg.optimizer.resume_schedule) is not None
    marker = os.path.join(t.output_dir, COMPLETE_MARKER)
    if dist.get_rank() == 0 and state.step < t.steps and os.path.exists(marker):
        # an earlier run's marker: this run trains further, so it is not complete until it ends
        os.remove(marker)
        log.info("removed %s of an earlier run (this run trains steps %d..%d)", COMPLETE_MARKER, state.step + 1,
                 t.steps)
    if resumed:
        return loaded_path(t.load, state.step)
    if t.pretrained_checkpoint:
        check_converted_architecture(cfg, t.pretrained_checkpoint)
        if load_checkpoint(state, t.pretrained_checkpoint, finetune=True) is None:
            raise ConfigError(f"train.pretrained_checkpoint={t.pretrained_checkpoint} holds no checkpoint; "
                              "run the previous stage first (or drop pretrained_checkpoint to start from scratch)")
    return None


def pretrain(
    cfg: RunConfig,
    task: Optional[Task] = None,
    *,
    param_group_hook: Optional[ParamGroupHook] = None,
    profiler: Optional[Profiler] = None,
) -> TrainState:
    """Train `task` (by default `task_for(cfg)`: text, omni, alignment or GSPO) for `cfg.train.steps` steps.

    `profiler` switches on megatron timers (rows of metrics.jsonl then carry `timers`: ms per
    timer, max over ranks) and an optional torch.profiler window; without one nothing is timed
    beyond the step wall time and rows keep their default keys.
    """
    task = task or task_for(cfg)
    t = cfg.train
    state = build_train_state(cfg, param_group_hook, task)
    is_logger = dist.get_rank() == 0
    root = checkpoints_root(cfg)
    if is_logger:
        os.makedirs(t.output_dir, exist_ok=True)
        dump_config(cfg, os.path.join(t.output_dir, "config.yaml"))
    check_overwrite(root, t.load, t.allow_overwrite)
    task.build_data(state)
    state.data_state = task.state_dict()  # the checkpoint loads this rank's data position into it
    loaded = resume(cfg, state)
    if state.step > 0:
        task.load_state_dict(state.data_state)

    metrics = MetricsWriter(t.output_dir, enabled=is_logger, tensorboard=t.tensorboard, start_step=state.step)
    preemption = PreemptionHandler()
    guard = NonFiniteGuard(t.skip_nonfinite_steps)
    spikes = LossSpikeDetector(t.loss_spike_factor, t.loss_spike_window, state.recent_losses) \
        if t.loss_spike_factor is not None else None
    if is_logger:  # spikes a crashed attempt logged past the checkpoint are logged again below
        drop_records_after(t.output_dir, state.step)
    if guard.enabled:
        disable_ddp_nan_check(state.model)

    meta = run_meta(cfg, task)
    world, n_micro, step_flops = meta["world"], meta["num_microbatches"], meta["flops_per_step"]
    if profiler is not None:
        profiler.attach(cfg, state, meta=meta)
        task = profiler.wrap_task(task)
    log.info("training %d steps | world %d = tp %d x pp %d x cp %d x dp %d | %d microbatches/step | %.3e FLOPs/step",
             t.steps, world, meta["tp"], meta["pp"], meta["cp"], meta["dp"], n_micro, step_flops)

    run_start, steps_run = time.time(), 0
    while state.step < t.steps:
        step = state.step + 1  # 1-based number of the step about to run
        if profiler is not None:
            profiler.step_begin(step)
        start = time.time()
        maybe_inject("step", step)  # tests/faults/ only: inert without $MEGATRON_OMNI_INJECT_FAULT
        logging_step = is_logging_step(t, step)
        if cfg.model.moe is not None:  # routing statistics (host reads) on logging steps only
            set_routing_stats_enabled(state.model, logging_step)
        result = train_step(
            state, task.step_iterators(state), num_microbatches=n_micro, seq_length=cfg.data.seq_length,
            micro_batch_size=t.micro_batch_size,
            forward_step_func=spiked_forward_step(task.forward_step_func, step),  # tests/faults/ only
            guard_step=step if guard.enabled else None,
        )
        step_time = time.time() - start
        state.step += 1
        state.consumed_samples += t.global_batch_size
        steps_run += 1

        task_row = task.step_metrics(state, result, step_time)  # collective
        # A task that knows its step's packed rows counts their LLM FLOPs (attention inside each sample)
        # and its encoders' work on this step's media; otherwise every row is one unpacked sequence.
        step_model_flops = task_row.get("llm_flops", step_flops) + task_row.get("encoder_flops", 0.0)
        tflops = step_model_flops / step_time / world / 1e12
        row = {
            "step": state.step, "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
            "tokens": result.tokens, "step_time_s": step_time,
            "tokens_per_s": t.global_batch_size * cfg.data.seq_length / step_time,
            "tflops_per_gpu": tflops, "mfu": flops.mfu(tflops, meta["device"], meta["precision"]),
            "consumed_samples": state.consumed_samples, **task_row,
        }
        nonfinite = result.grad_norm is not None and not math.isfinite(result.grad_norm)
        if nonfinite:
            row["skipped_update"] = True
        # a skipped step names its microbatches with a non-finite loss (collective, on such steps only)
        diverged = guard.record(state.step, not nonfinite, nonfinite_detail(gather_step_microbatches(
            task.step_samples(state), result.losses_reduced)) if nonfinite else "") if guard.enabled else None
        reference = spikes.check(result.loss) if spikes is not None and not nonfinite else None
        if reference is not None:  # collective, entered by every rank: all hold the same loss
            record_spike(t.output_dir, step=state.step, loss=result.loss, reference=reference,
                         factor=t.loss_spike_factor, window=t.loss_spike_window, samples=task.step_samples(state),
                         losses_reduced=result.losses_reduced, modality_losses=row.get("losses"))
            row["loss_spike_reference"] = reference
        if cfg.model.moe is not None and logging_step:
            row["moe"] = collect_routing_stats(state.model)  # collective: every rank takes part
        if profiler is not None:
            row["timers"] = profiler.step_end(state.step, row)  # collective: every rank takes part
        if t.eval_interval and state.step % t.eval_interval == 0:
            if cfg.model.moe is not None:  # validation forwards are not training routing statistics
                set_routing_stats_enabled(state.model, False)
            row.update(task.validate(state))  # collective
        if is_logger:
            metrics.write(row)
            if logging_step:
                eta = (time.time() - run_start) / steps_run * (t.steps - state.step)
                log.info(progress_line(row, total=t.steps, eta_s=eta))
                if row.get("timers"):
                    log.info(timers_line(row["timers"]))

        stop = preemption.should_stop()
        exiting = stop or diverged is not None or (t.exit_interval is not None and state.step >= t.exit_interval)
        saving = profiler is None or profiler.save_checkpoints
        if saving and ((t.save_interval and state.step % t.save_interval == 0) or exiting or state.step == t.steps):
            task.before_checkpoint()
            state.data_state = task.state_dict()
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
