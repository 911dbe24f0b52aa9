"""Host syncs per training step of an omni config, by call site, on every rank.

    torchrun --nproc_per_node 2 tools/count_host_syncs.py --config configs/tiny/omni_mock.yaml parallel.pp=2

Builds the run as the training loop does (`task_for`, `build_train_state`, `Task.build_data`), trains
`warmup` steps uncounted (first-call caches, optimizer state allocation), then counts
`steps` steps with `HostSyncCounter`, three windows per step:

* ``step``: `train_step` -- forward, backward and optimizer through megatron's schedule (what
  `tests/profiling/test_host_syncs.py` bounds);
* ``data``: `Task.step_iterators` -- drawing and planning the step's microbatches;
* ``log``: what the loop adds for the metrics row (`Task.step_metrics`, MoE routing statistics on
  logging steps).

Counts are per step (summed over the counted steps, divided by their number).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Dict, Optional, Sequence

import torch.distributed as dist

from megatron_omni.profiling.host_sync import HostSyncCounter

WINDOWS = ("data", "step", "log")


def count_step_syncs(config: str, overrides: Sequence[str] = (), *, steps: int = 2, warmup: int = 1,
                     log_every_step: bool = False, backend: str = "torch_function") -> Optional[Dict]:
    """Inside a torchrun world (every rank calls it).  Returns, on rank 0, {"ranks": [per rank
    {window: {"total": n, "sites": {site: n}, "transfers": {site: [n, bytes]}}}], "steps": ...};
    None on other ranks; per rank also "moe_stats_recorded" [bool per counted step].  `log_every_step` makes every counted step a logging step (MoE
    statistics collected); by default the counted steps are not logging steps."""
    from megatron_omni.config import load_config
    from megatron_omni.models.moe.stats import collect_routing_stats, moe_routers, set_routing_stats_enabled
    from megatron_omni.training.loop import build_train_state, is_logging_step
    from megatron_omni.training.step import train_step
    from megatron_omni.training.tasks import num_microbatches, task_for

    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps} warmup={warmup}")
    total_steps = warmup + steps
    log_interval = 1 if log_every_step else total_steps + 1  # the last step always logs: one past it
    cfg = load_config(config, [*overrides, f"train.steps={total_steps + 1}", f"train.log_interval={log_interval}"])
    if cfg.omni is None:
        raise ValueError(f"{config}: count_step_syncs measures the omni step; the config has no omni section")
    task = task_for(cfg)
    state = build_train_state(cfg, task=task)
    task.build_data(state)
    windows = {w: HostSyncCounter(backend) for w in WINDOWS}
    recorded = []  # per counted step: did any MoE router record routing statistics
    for i in range(total_steps):
        counted = i >= warmup
        logging_step = is_logging_step(cfg.train, state.step + 1)

        def window(name):
            return windows[name] if counted else HostSyncCounter(backend)

        set_routing_stats_enabled(state.model, logging_step)
        with window("data"):
            iterators = task.step_iterators(state)
        with window("step"):
            start = time.time()
            result = train_step(state, iterators, num_microbatches=num_microbatches(cfg),
                                seq_length=cfg.data.seq_length, micro_batch_size=cfg.train.micro_batch_size,
                                forward_step_func=task.forward_step_func)
            step_time = time.time() - start
        state.step += 1
        if counted:
            recorded.append(any(r.counter.counts for r in moe_routers(state.model)))
        with window("log"):
            task.step_metrics(state, result, step_time)  # the row's reductions and reads (collective)
            if cfg.model.moe is not None and logging_step:
                collect_routing_stats(state.model)
    mine = {**{w: _summary(c, steps) for w, c in windows.items()}, "moe_stats_recorded": recorded}
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    if dist.get_rank() != 0:
        return None
    return {"config": config, "overrides": list(overrides), "steps": steps, "warmup": warmup,
            "logging_steps": log_every_step, "backend": backend, "ranks": parts}


def _summary(counter: HostSyncCounter, steps: int) -> Dict:
    def per_step(n):
        return n / steps

    return {"total": per_step(counter.total),
            "sites": {site: per_step(n) for site, n in counter.by_site().items()},
            "transfers": {site: [per_step(n), per_step(counter.transfer_bytes[site])]
                          for site, n in counter.transfers.most_common()}}


def format_counts(result: Dict) -> str:
    """Per rank and window: total syncs per step, then by call site."""
    lines = []
    for rank, windows in enumerate(result["ranks"]):
        for w in WINDOWS:
            entry = windows[w]
            lines.append(f"rank {rank} {w}: {entry['total']:g} host syncs / step")
            lines += [f"  {n:7g}  {site}" for site, n in entry["sites"].items()]
            if entry["transfers"]:
                copies = sum(n for n, _ in entry["transfers"].values())
                nbytes = sum(b for _, b in entry["transfers"].values())
                lines.append(f"  host->device copies: {copies:g} / step, {nbytes:g} bytes")
                lines += [f"  {n:7g}  {site}  ({b:g} bytes)" for site, (n, b) in entry["transfers"].items()]
    return "\n".join(lines)


def merge_sites(result: Dict, window: str = "step") -> Counter:
    """Call-site counts of `window` summed over ranks."""
    out: Counter = Counter()
    for windows in result["ranks"]:
        out.update(windows[window]["sites"])
    return out
