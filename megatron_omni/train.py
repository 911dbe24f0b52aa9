"""Entry point: `torchrun --nproc_per_node N -m megatron_omni.train --config CFG.yaml [section.key=value ...]`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_omni.train",
        description="Train a megatron-omni model. Overrides are section.key=value (YAML values).",
    )
    parser.add_argument("--config", required=True, help="run config YAML, e.g. configs/tiny/llm.yaml")
    parser.add_argument("overrides", nargs="*", help="e.g. parallel.tp=2 train.steps=5 train.output_dir=runs/x")
    return parser.parse_args(argv)


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s rank{rank}] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    setup_logging()
    from megatron_omni.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        from megatron_omni.profiling.profiler import StepProfiler, options_for_training
        from megatron_omni.training.loop import pretrain
        from megatron_omni.training.tasks import task_for

        # train.timing_log_level: megatron timers in every metrics row (checkpoints as usual)
        options = options_for_training(cfg.train.timing_log_level)
        pretrain(cfg, task_for(cfg), profiler=StepProfiler(options) if options is not None else None)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    finally:
        from megatron_omni.parallel.initialize import destroy_distributed

        destroy_distributed()
    return 0


# The guard matters beyond style: megatron's checkpoint writer starts a *spawn*
# multiprocessing manager, which re-imports __main__; unguarded, that child would
# start training again and the save would hang.
if __name__ == "__main__":
    sys.exit(main())
