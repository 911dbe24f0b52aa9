"""Throughput profiling: megatron timers in the loop, torch.profiler traces, report + charts.

    torchrun --nproc_per_node 4 tools/profile_throughput.py --config configs/tiny/llm.yaml \
        --steps 10 --out runs/profile parallel.tp=2 parallel.pp=2

Library use: `pretrain(cfg, profiler=StepProfiler(ProfileOptions(...)))`, or `run_profile(...)`.
"""

from megatron_omni.profiling.profiler import ProfileOptions, StepProfiler, options_for_training
from megatron_omni.profiling.run import parse_trace_steps, run_profile

__all__ = ["ProfileOptions", "StepProfiler", "options_for_training", "parse_trace_steps", "run_profile"]
