"""Sharded checkpoints with megatron-core dist_checkpointing (torch_dist backend).

Layout, as in Megatron-LM so its users' tooling applies:
    <root>/iter_0000050/                 one checkpoint (written by every rank, read at any layout)
    <root>/latest_checkpointed_iteration.txt

What is saved: model and optimizer as ShardedTensors in *model space* (so a
checkpoint written at TP2xPP2 loads at TP1xPP1 and back), the LR scheduler, the
step and data position (common state), and every rank's RNG states (a
ShardedObject indexed by (pp, tp, dp) rank; restored only when the layout is
unchanged, since RNG streams have no meaning across layouts).
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import (
    get_default_load_sharded_strategy,
    get_default_save_sharded_strategy,
)
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper,
    FullyParallelSaveStrategyWrapper,
)

from megatron_omni.parallel.layout import unwrap
from megatron_omni.training.ckpt_integrity import (
    CorruptCheckpoint,
    iter_dirs,
    complete_checkpoints,
    prune,
    verify_checkpoint,
    write_manifest,
)
from megatron_omni.training.setup import TrainState
from megatron_omni.training.vocab_padding import request_whole_vocab_tensors, take_own_rows

log = logging.getLogger(__name__)

TRACKER_FILE = "latest_checkpointed_iteration.txt"


def checkpoint_dir(root: str, step: int) -> str:
    return os.path.join(root, f"iter_{step:07d}")


def latest_step(root: str) -> Optional[int]:
    """Step recorded in the tracker file, or None when `root` holds no checkpoint."""
    tracker = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(tracker):
        return None
    text = open(tracker).read().strip()
    if not text.isdigit():
        raise ValueError(f"{tracker}: expected an iteration number, found {text!r}")
    return int(text)


def loaded_path(load: str, step: int) -> str:
    """The checkpoint folder `train.load=load` resumed at `step` (an iter_ folder or the root's)."""
    return load if os.path.basename(os.path.normpath(load)).startswith("iter_") else checkpoint_dir(load, step)


def check_overwrite(root: str, load: Optional[str], allow: bool) -> None:
    """Refuse to start a run whose checkpoints would overwrite (and prune) another run's: `root`
    (output_dir/checkpoints) holds checkpoints and `train.load` does not point at them -- the
    typical typo in train.load, which Megatron-LM answers with a fresh start over the old run."""
    if allow or not complete_checkpoints(root):
        return
    if load:
        target = os.path.realpath(load)
        if os.path.basename(os.path.normpath(load)).startswith("iter_"):
            target = os.path.dirname(target)
        if target == os.path.realpath(root):
            return
    from megatron_omni.config import ConfigError

    raise ConfigError(
        f"{root} already holds checkpoints (steps {complete_checkpoints(root)}) but train.load="
        f"{load!r} does not point at them, so this run would start over and overwrite them; set "
        f"train.load={root} to resume, choose another train.output_dir, or set train.allow_overwrite=true")


def _layout() -> Dict[str, int]:
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(with_context_parallel=True),
        "vpp": parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1,
    }


def _per_rank_object(key: str, obj: Any) -> ShardedObject:
    """`obj` saved once per (pp, tp, dp) rank; restored only at the same layout."""
    pp, tp = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()
    dp = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    lay = _layout()
    return ShardedObject(key, obj, (lay["pp"], lay["tp"], lay["dp"]), (pp, tp, dp), replica_id=0)


def _dp_gather(obj: Any) -> list:
    """`obj` of every data-parallel rank, in DP-rank order (a collective over the DP group)."""
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, obj, group=group)
    return parts


def _rng_object() -> ShardedObject:
    """This rank's RNG states (python, numpy, torch, megatron's TP tracker)."""
    return _per_rank_object("rng_state", {
        "random": random.getstate(),
        "np": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    })


def _restore_rng(states: Dict[str, Any]) -> None:
    random.setstate(states["random"])
    np.random.set_state(states["np"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(states["tracker"])


def _sharded_state_dict(state: TrainState, *, is_loading: bool, with_optimizer: bool,
                        with_rng: bool, optimizer_sharding: str) -> Dict[str, Any]:
    metadata = {"distrib_optim_sharding_type": optimizer_sharding}
    sd: Dict[str, Any] = {}
    # Like Megatron-LM: state dicts of the bare model (no DDP/Float16Module key prefixes).
    chunks = [unwrap(chunk) for chunk in state.model]
    if len(chunks) == 1:
        sd["model"] = chunks[0].sharded_state_dict(metadata=metadata)
    else:
        for i, chunk in enumerate(chunks):
            sd[f"model{i}"] = chunk.sharded_state_dict(metadata=metadata)
    if with_optimizer and optimizer_holds_params(state.optimizer):
        sd["optimizer"] = state.optimizer.sharded_state_dict(sd, is_loading=is_loading, metadata=metadata)
    if with_optimizer:
        sd["scheduler"] = state.scheduler.state_dict()
        sd["train_state"] = {"step": state.step, "consumed_samples": state.consumed_samples,
                             "recent_losses": list(state.recent_losses)}
    if with_rng:
        sd["rng_state"] = _rng_object()
        if state.data_state is not None:  # this rank's data-loader position (omni loader)
            sd["data_state"] = _per_rank_object("data_state", state.data_state)
            if not is_loading:  # and every DP rank's, in the common state: for a resume at a new layout
                sd["data_positions"] = _dp_gather(state.data_state)
    sd["layout"] = _layout()
    return sd


def save_checkpoint(state: TrainState, root: str, extra: Optional[Dict[str, Any]] = None,
                    keep_last: Optional[int] = None, optimizer_sharding: str = "fully_reshardable",
                    protect: Optional[str] = None) -> str:
    """Write `root/iter_<step>` from every rank, its checksum manifest, then point the tracker at it.

    Refuses (before writing anything) when a parameter is non-finite.  `protect` (the checkpoint
    this run loaded) is never pruned, nor is the new one."""
    from megatron_omni.training.fault_injection import maybe_inject
    from megatron_omni.training.guards import NonFiniteError, parameters_finite

    if not parameters_finite(state.model, state.optimizer):
        raise NonFiniteError(f"step {state.step}: the model has NaN/Inf parameters or optimizer state; refusing to "
                             f"save them over "
                             f"{root} (the previous checkpoint, step {latest_step(root)}, stays in force)")
    path = checkpoint_dir(root, state.step)
    if dist.get_rank() == 0:
        if os.path.isdir(path):  # a crashed earlier save of the same step: start clean
            shutil.rmtree(path)
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    sd = _sharded_state_dict(state, is_loading=False, with_optimizer=True, with_rng=True,
                             optimizer_sharding=optimizer_sharding)
    sd["optimizer_sharding"] = optimizer_sharding
    if extra:
        sd["extra"] = extra
    strategy = FullyParallelSaveStrategyWrapper(
        get_default_save_sharded_strategy("torch_dist"),
        parallel_state.get_data_parallel_group(with_context_parallel=True),
    )
    try:
        dist_checkpointing.save(sd, path, sharded_strategy=strategy)
        maybe_inject("save", state.step)  # tests/faults/: a crash or a full disk before the commit
    except (OSError, RuntimeError) as exc:
        if "No space left" not in str(exc) and getattr(exc, "errno", None) != errno.ENOSPC:
            raise
        if dist.get_rank() == 0:
            shutil.rmtree(path, ignore_errors=True)
        raise OSError(errno.ENOSPC, f"disk full while writing checkpoint {path} ({exc}); the partial folder was "
                                    f"removed and the previous checkpoint (step {latest_step(root)}) stays in force; "
                                    "free space or set train.keep_last_checkpoints") from exc
    dist.barrier()
    write_manifest(path, state.step)  # collective; the commit marker, written before the tracker
    if dist.get_rank() == 0:
        # The tracker is written last, atomically: a crash mid-save leaves the previous one in force.
        tmp = os.path.join(root, TRACKER_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.write(str(state.step))
        os.replace(tmp, os.path.join(root, TRACKER_FILE))
        if keep_last:
            prune(root, keep_last, protect=(path, protect))
    dist.barrier()
    return path


def optimizer_holds_params(optimizer) -> bool:
    """False on a rank whose model part is entirely frozen (e.g. a pipeline stage of the LLM while
    only the connectors train, paper Table 2 PT-1): megatron's optimizer has no state to save there."""
    return any(len(g["params"]) for g in optimizer.param_groups)


def _prime_torch_adam_state(optimizer) -> None:
    """Give a never-stepped torch Adam(W) its state tensors before loading into it.

    megatron falls back to torch.optim.AdamW without apex/TE, and its
    DistributedOptimizer.state_dict() then reads Adam's per-param `step`, which torch
    only creates at the first update: loading into a fresh optimizer would assert.
    (With TE/apex FusedAdam megatron takes another branch and this does nothing.)
    """
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(p.data),
                        "exp_avg_sq": torch.zeros_like(p.data),
                    }


def _load_optimizer(optimizer, state_dict) -> None:
    """optimizer.load_state_dict, working around megatron 0.16's torch-AdamW path.

    Without TE/apex, DistributedOptimizer.load_state_dict adds torch's per-param `step`
    to the Adam state and then copies *every* state key from the fully-reshardable
    param_state, which has no `step` (KeyError).  So: load everything but param_state,
    then load param_state with `step` set aside, then put `step` back -- one tensor per
    parameter: megatron hands every parameter the same `step` tensor, and torch's AdamW
    increments it in place once per parameter, which would corrupt bias correction.
    With FusedAdam (GPU) the plain call is used.
    """
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    torch_adam = [isinstance(getattr(s, "optimizer", None), (torch.optim.Adam, torch.optim.AdamW)) for s in subs]
    if not any(torch_adam):
        optimizer.load_state_dict(state_dict)
        return
    parts = [state_dict] if len(subs) == 1 else [v for _, v in sorted(state_dict.items())]
    for sub, sd in zip(subs, parts):
        param_state = sd.pop("param_state", None)
        sub.load_state_dict(sd)
        if param_state is None:
            continue
        steps = {p: st.pop("step") for p, st in sub.optimizer.state.items() if "step" in st}
        loader = getattr(sub, f"load_parameter_state_from_{sd['param_state_sharding_type']}")
        loader(param_state)
        for p, step in steps.items():
            sub.optimizer.state[p]["step"] = step.clone()


def _drop_new_adapters(sd: Dict[str, Any], stored: Dict[str, Any]) -> set:
    """Starting LoRA fine-tuning from a checkpoint without adapters (the alignment stage from
    IT-3): the adapters' entries are not in it, so they are not requested and keep their fresh
    init (B = 0: the model starts as the checkpoint).  `stored` is the checkpoint's tensor
    metadata.  Returns the dropped parameter names."""
    dropped = set()
    for key in [k for k in sd if k.startswith("model")]:
        for name in list(sd[key]):
            entry = sd[key][name]
            if ".lora." in name and getattr(entry, "key", None) not in stored:
                del sd[key][name]
                dropped.add(name)
    return dropped


def _check_model_matches(sd: Dict[str, Any], stored: Dict[str, Any], path: str) -> None:
    """Before loading: every model tensor this run asks for must be in the checkpoint with the same
    global shape.  One message for what is missing or reshaped, instead of a storage error deep
    in dist_checkpointing (typically an LLM-only checkpoint given to an omni run)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    missing, reshaped = [], []
    for key in [k for k in sd if k.startswith("model")]:
        for entry in sd[key].values():
            if not isinstance(entry, ShardedTensor):
                continue
            if entry.key not in stored:
                missing.append(entry.key)
            elif tuple(stored[entry.key].global_shape) != tuple(entry.global_shape):
                reshaped.append(f"{entry.key} {tuple(stored[entry.key].global_shape)} -> {tuple(entry.global_shape)}")
    missing, reshaped = list(dict.fromkeys(missing)), list(dict.fromkeys(reshaped))  # one entry per key, not shard
    if not (missing or reshaped):
        return
    omni = any(k.startswith(("vision.", "audio.")) for k in missing)
    hint = (" This looks like a language-model-only checkpoint (e.g. tools/convert_checkpoint.py hf-to-mcore) "
            "given to an omni model: the omni vocabulary is larger and the encoders are not in it.  Build the omni "
            "checkpoint from the pretrained parts with `tools/convert_checkpoint.py omni-from-hf --llm LLAMA_DIR "
            "[--vision DIR] [--audio DIR] --out OUT` and start PT-1 with train.pretrained_checkpoint=OUT."
            if omni else " The checkpoint was written for another model (its run directory's config.yaml has the "
            "model section it needs): train with that model config, or point train.load at this model's checkpoints."
            if reshaped else "")
    raise RuntimeError(f"{path}: checkpoint does not match the model: {len(missing)} tensors missing "
                       f"{missing[:4]}, {len(reshaped)} with another shape {reshaped[:3]}.{hint}")


_SCHEDULE_FIELDS = {  # scheduler attribute -> the config key it comes from
    "max_lr": "optimizer.lr", "min_lr": "optimizer.min_lr", "lr_warmup_steps": "optimizer.lr_warmup_steps",
    "lr_decay_steps": "optimizer.lr_decay_steps (default train.steps)", "lr_decay_style": "optimizer.lr_decay_style",
}


def _load_scheduler(scheduler, saved: Dict[str, Any], schedule: str, path: str, groups: list) -> None:
    """One consistent LR schedule after a resume, said in the log.

    schedule="config" (megatron's --override-opt_param-scheduler): the config's lr, min_lr, warmup,
    decay length and style, continued from the checkpoint's step.  schedule="checkpoint"
    (--use-checkpoint-opt_param-scheduler): the checkpoint's, with every parameter group's
    max_lr/min_lr rescaled by the same ratio (an encoder LR keeps its ratio to the LLM's)."""
    changed = {attr: (saved[attr], getattr(scheduler, attr)) for attr in _SCHEDULE_FIELDS
               if attr in saved and saved[attr] != getattr(scheduler, attr)}
    config_max, config_min = scheduler.max_lr, scheduler.min_lr
    scheduler.override_opt_param_scheduler = schedule == "config"
    scheduler.use_checkpoint_opt_param_scheduler = schedule == "checkpoint"
    scheduler.load_state_dict(saved)  # steps the scheduler to the checkpoint's step
    if schedule == "checkpoint":
        for group in groups:
            if "max_lr" in group and config_max:
                group["max_lr"] *= scheduler.max_lr / config_max
            if "min_lr" in group and config_min:
                group["min_lr"] *= scheduler.min_lr / config_min
        scheduler.step(increment=0)  # recompute the groups' lr with the rescaled bounds
    detail = "; ".join(f"{_SCHEDULE_FIELDS[a]}: checkpoint {c!r}, config {n!r}" for a, (c, n) in changed.items())
    log.info("LR schedule after resume: the %s's (lr %g, min_lr %g, warmup %d, decay %d steps %s) from step %d%s",
             schedule, scheduler.max_lr, scheduler.min_lr, scheduler.lr_warmup_steps, scheduler.lr_decay_steps,
             scheduler.lr_decay_style, scheduler.num_steps,
             f"; differs from the {'checkpoint' if schedule == 'config' else 'config'} in {detail} "
             f"(optimizer.resume_schedule=config|checkpoint chooses)" if changed else "")


def _candidates(root: str) -> Optional[list]:
    """Checkpoints to try for `train.load=root`, newest first: the tracker's, then (if it is
    corrupt) the earlier complete ones in write order.  None when `root` holds none."""
    if os.path.basename(os.path.normpath(root)).startswith("iter_"):
        if not os.path.isfile(os.path.join(root, "metadata.json")):
            raise FileNotFoundError(f"train.load={root}: not a checkpoint (no metadata.json there)")
        return [root]  # named explicitly: no fallback
    step = latest_step(root)
    if step is None:
        return None
    partial = sorted(s for s in iter_dirs(root) if s > step)
    if partial and dist.get_rank() == 0:  # what a crash mid-save (or a run that failed to commit) leaves
        log.warning("train.load=%s: ignoring iter_ folder(s) of steps %s past the tracker's step %d (saves that "
                    "never committed, or what a restart from an earlier step left); they are replaced when those "
                    "steps are saved again", root, partial, step)
    newest = checkpoint_dir(root, step)
    return [newest] + [checkpoint_dir(root, s) for s in reversed(complete_checkpoints(root)) if s != step]


def load_checkpoint(state: TrainState, root: str, *, finetune: bool = False,
                    schedule: str = "config") -> Optional[Dict[str, Any]]:
    """Resume from the latest checkpoint in `root` (or from `root` itself if it is an iter_ folder).

    As Megatron-LM's --load: a folder with no checkpoint yet (a job's first start, with the
    same folder as its save target) is a warning and a fresh start, returning None.
    Every file is checked against the checksum manifest first; a corrupt, truncated or partial
    newest checkpoint is reported (file named) and the previous complete one is loaded instead.
    finetune=True loads weights only (fresh optimizer, scheduler, step and data position).
    `schedule`: whose LR schedule runs after the resume ("config" or "checkpoint", see
    `_load_scheduler`).  Returns the checkpoint's `extra` dict (data-loader and balancer states).
    """
    candidates = _candidates(root)
    if candidates is None:
        log.warning("train.load=%s holds no checkpoint (%s missing): starting from scratch", root, TRACKER_FILE)
        return None
    errors = []
    for path in candidates:
        try:
            verify_checkpoint(path)  # collective: every rank agrees
            extra = _load_from(state, path, finetune=finetune, schedule=schedule)
        except CorruptCheckpoint as exc:
            errors.append(str(exc))
            log.error("%s", exc)
            continue
        if errors:
            log.warning("train.load=%s: loaded the previous complete checkpoint %s instead of the corrupt newer "
                        "one(s) (%s)", root, path, "; ".join(errors))
        return extra
    raise CorruptCheckpoint(f"train.load={root}: no loadable checkpoint: " + " | ".join(errors) +
                            ". Restore the files, or point train.load at another checkpoint folder")


def _load_from(state: TrainState, path: str, *, finetune: bool, schedule: str) -> Dict[str, Any]:
    # The per-group hyper-parameters come from the config (parameter-group overrides such as the
    # encoder LR); megatron 0.16 leaves every group with one group's max_lr/min_lr after a load,
    # so the built ones are put back afterwards (only the optimizer *state* is loaded).
    built = [{k: v for k, v in g.items() if k not in ("params", "lr", "weight_decay")}
             for g in state.optimizer.param_groups] if state.optimizer is not None else []
    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except Exception as exc:  # a truncated common.pt: EOFError / UnpicklingError without a file name
        raise CorruptCheckpoint(f"{path}/common.pt: unreadable ({exc!r})") from exc
    same_layout = common.get("layout") == _layout()
    with_optimizer = not finetune and "optimizer" in common
    if with_optimizer:
        _prime_torch_adam_state(state.optimizer)
    sd = _sharded_state_dict(state, is_loading=True, with_optimizer=with_optimizer,
                             with_rng=with_optimizer and same_layout,
                             optimizer_sharding=common.get("optimizer_sharding", "fully_reshardable"))
    if "extra" in common:
        sd["extra"] = common["extra"]
    strategy = FullyParallelLoadStrategyWrapper(
        get_default_load_sharded_strategy(path),
        parallel_state.get_data_parallel_group(with_context_parallel=True),
    )
    stored = dist_checkpointing.load_tensors_metadata(path)
    chunks = [unwrap(chunk) for chunk in state.model]
    model_keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    new_adapters = _drop_new_adapters(sd, stored) if finetune else set()
    # weights only: the vocabulary may be padded for another TP size (e.g. omni-from-hf --tp 2, run at TP4)
    repadded = request_whole_vocab_tensors(sd, stored, chunks, model_keys) if finetune else []
    _check_model_matches(sd, stored, path)
    try:
        loaded = dist_checkpointing.load(sd, path, sharded_strategy=strategy)
    except (EOFError, OSError, ValueError) as exc:  # truncated/missing shard of an unverified checkpoint
        raise CorruptCheckpoint(f"{path}: reading the checkpoint failed ({exc!r}); a shard file is missing "
                                "or truncated") from exc
    take_own_rows(loaded, repadded)
    if repadded:
        log.info("%s: vocabulary padded for another TP size or make_vocab_size_divisible_by; %s read whole, "
                 "this rank's rows taken", path,
                 ", ".join(sorted({r.name for r in repadded})))
    for chunk, key in zip(chunks, model_keys):
        missing, unexpected = chunk.load_state_dict(loaded[key], strict=not new_adapters)
        left = [k for k in missing if k not in new_adapters and not k.endswith("_extra_state")]
        if left or unexpected:
            raise RuntimeError(f"{path}: checkpoint does not match the model: missing {left[:5]}, unexpected {unexpected[:5]}")
    if state.optimizer is not None and not (with_optimizer and "optimizer" in loaded):
        # bf16/fp16 keep fp32 main copies of the weights in the optimizer, made from the init when it
        # was built: refresh them from the loaded weights (as Megatron-LM does without optimizer
        # state), or the first step writes the init back over the checkpoint.
        state.optimizer.reload_model_params()
    if with_optimizer:
        if "optimizer" in loaded:
            _load_optimizer(state.optimizer, loaded["optimizer"])
            for group, config in zip(state.optimizer.param_groups, built):
                group.update(config)
        _load_scheduler(state.scheduler, loaded["scheduler"], schedule, path, state.optimizer.param_groups)
        state.step = loaded["train_state"]["step"]
        state.consumed_samples = loaded["train_state"]["consumed_samples"]
        state.recent_losses[:] = loaded["train_state"].get("recent_losses", [])  # absent before loss spikes
        if same_layout:
            _restore_rng(loaded["rng_state"])
            if "data_state" in loaded:
                state.data_state = loaded["data_state"]
        elif state.data_state is not None and "data_positions" in common:
            positions = common["data_positions"]
            dp = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
            # same DP size (TP/PP changed): this DP rank's exact position; else every old rank's,
            # for the data source to re-split (OmniData.load_state_dict)
            state.data_state = positions[parallel_state.get_data_parallel_rank(with_context_parallel=True)] \
                if len(positions) == dp else positions
            log.info("layout changed %s -> %s: data position %s", common.get("layout"), _layout(),
                     "kept (same DP size)" if len(positions) == dp else f"re-split from {len(positions)} DP ranks")
        elif state.data_state is not None:
            log.warning("%s: layout changed %s -> %s and the checkpoint has no layout-independent data position "
                        "(written before it existed): the data starts afresh", path, common.get("layout"), _layout())
    log.info(
        "loaded %s (%s; layout %s -> %s)", path, "weights only" if not with_optimizer else f"step {state.step}",
        common.get("layout"), _layout(),
    )
    return loaded.get("extra", {}) or {}
