"""Host syncs per omni training step, by call site (megatron_omni/profiling/sync_count.py).

    torchrun --nproc_per_node 1 tools/count_host_syncs.py --config configs/tiny/omni_mock.yaml
    torchrun --nproc_per_node 2 tools/count_host_syncs.py --config configs/tiny/omni_mock.yaml parallel.pp=2
    ... --json out.json   (the counts as JSON: {"ranks": [{window: {"total", "sites", "transfers"}}]})
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=2, help="counted steps (after --warmup uncounted ones)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--logging-steps", action="store_true",
                        help="count logging steps (MoE routing statistics recorded and collected)")
    parser.add_argument("--backend", choices=("torch_function", "cuda"), default="torch_function",
                        help="cuda: torch.cuda.set_sync_debug_mode('warn') on a GPU (actual syncs only)")
    parser.add_argument("--json", help="write the counts here (rank 0)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_intermixed_args()
    from megatron_omni.parallel.initialize import destroy_distributed
    from megatron_omni.profiling.sync_count import count_step_syncs, format_counts

    try:
        result = count_step_syncs(args.config, args.overrides, steps=args.steps, warmup=args.warmup,
                                  log_every_step=args.logging_steps, backend=args.backend)
    finally:
        destroy_distributed()
    if result is not None:
        print(format_counts(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
