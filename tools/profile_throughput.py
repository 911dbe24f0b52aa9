"""Profile N training steps of any config: tokens/s, TFLOP/s/GPU, MFU, time split, traces.

    torchrun --nproc_per_node N tools/profile_throughput.py --config CFG [--steps 10] [--warmup 2] \
        [--trace-steps a:b | none] [--timing-log-level 2] --out DIR [section.key=value ...]

Writes DIR/report.md (+ profile.json), DIR/time_split.png, DIR/step_time.png,
DIR/trace_rank{r}.json (Chrome traces of the --trace-steps window, default: the two
steps after warmup) and the run's DIR/metrics.jsonl, whose rows carry `timers`.
Works on GPUs (NCCL) and on CPU (CUDA emulated, gloo).

An omni config (configs/tiny/omni_mock.yaml; configs/tiny/pt_stage3.yaml data.root=DIR after
tools/make_demo_data.py --out DIR) adds tokens/s per modality, the encoders' FLOPs (in TFLOP/s/GPU
and MFU, and their share per modality) and the step's microbatch fetch (data-fetch) to the report:

    torchrun --nproc_per_node 4 tools/profile_throughput.py --config configs/tiny/omni_mock.yaml \
        --steps 6 --warmup 2 --out runs/profile_omni parallel.tp=2 parallel.pp=2
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/profile_throughput.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="run config YAML, e.g. configs/tiny/llm.yaml")
    p.add_argument("--out", required=True, help="output folder (report, charts, traces, metrics.jsonl)")
    p.add_argument("--steps", type=int, default=10, help="training steps to run (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the statistics (default 2)")
    p.add_argument("--trace-steps", default=None,
                   help="torch.profiler window 'a:b' (1-based, inclusive) or 'none'; default: 2 steps after warmup")
    p.add_argument("--timing-log-level", type=int, default=2, choices=(0, 1, 2),
                   help="megatron timer level: 2 (default) adds forward/backward compute, p2p and data wait")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. parallel.tp=2 parallel.pp=2")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from megatron_omni.train import setup_logging

    setup_logging()
    from megatron_omni.config import ConfigError
    from megatron_omni.parallel.initialize import destroy_distributed
    from megatron_omni.profiling import parse_trace_steps, run_profile

    try:
        window = parse_trace_steps(args.trace_steps, args.steps, args.warmup)
        run_profile(args.config, args.overrides, out=args.out, steps=args.steps, warmup=args.warmup,
                    trace_steps=window, trace=window is not None, timing_log_level=args.timing_log_level)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy_distributed()
    return 0


# Guard required: megatron's checkpoint writer spawns a process that re-imports __main__.
if __name__ == "__main__":
    sys.exit(main())
