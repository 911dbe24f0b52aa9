"""Initialise an MoE model from a dense checkpoint (sparse upcycling), at any TP / PP / EP.

    torchrun --nproc_per_node N tools/upcycle_moe.py --config configs/tiny/moe_llm.yaml \
        --dense-load runs/tiny_llm/checkpoints --out runs/moe_init [--noise-std 1e-3] \
        [parallel.tp=2 parallel.ep=2 parallel.sequence_parallel=true ...]

The dense model is the run config's model without its `moe` section (or --dense-model YAML).
Every routed expert and the shared expert copy the dense MLP (routed ones + N(0, noise_std^2)
noise), the router starts random (train.seed), everything else is copied.  Train from it with
`train.load=runs/moe_init train.finetune=true`; the checkpoint loads at any layout.
Without torchrun it runs as a world of one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="MoE run config (its model.moe and parallel sections)")
    parser.add_argument("--dense-load", required=True, help="dense checkpoints folder (or one iter_ folder)")
    parser.add_argument("--dense-model", help="dense model YAML (default: the run config's model without moe)")
    parser.add_argument("--out", required=True, help="folder for the MoE checkpoint")
    parser.add_argument("--noise-std", type=float, default=0.0, help="std of the noise added to routed experts")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. parallel.ep=2")
    args = parser.parse_args(argv)

    from megatron_omni.config import ConfigError, load_config, validate
    from megatron_omni.config.loader import load_section_file
    from megatron_omni.config.schema import ModelConfig
    from megatron_omni.training.upcycle import upcycle
    from megatron_omni.parallel.initialize import destroy_distributed, initialize_distributed, set_random_seeds
    from megatron_omni.train import setup_logging

    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        dense = load_section_file(ModelConfig, args.dense_model) if args.dense_model else None
        import torch.distributed as dist

        initialize_distributed(cfg.parallel)
        validate(cfg, dist.get_world_size())
        set_random_seeds(cfg.train.seed)
        upcycle(cfg, args.dense_load, args.out, dense_model=dense, noise_std=args.noise_std)
    except (ConfigError, ValueError) as e:
        print(f"upcycle error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
