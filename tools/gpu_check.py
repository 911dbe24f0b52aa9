#!/usr/bin/env python
"""One-command acceptance check of every CUDA path on one GPU (thin CLI over megatron_omni.gpu_check).

    python tools/gpu_check.py --out DIR [--quick] [--budget S] [--only train,throughput] [--data-root DEMO_DATA]
    python tools/gpu_check.py --out DIR --dry-run          # CPU: build every check's config, list them
    python tools/gpu_check.py --out DIR --device cpu       # the checks' logic on tiny sizes, no GPU

Writes DIR/gpu_check.json and DIR/gpu_check.md (pass / fail / skipped with the reason, and the
numbers of every check), rewritten after each group; DIR/logs/<group>.log holds each group's output.
Under 8 minutes on one H100/H200 (under 4 with --quick).  On a bare machine (torch + CUDA and the
megatron-core wheel: tools/gpu_check_bootstrap.sh) the TE / DALI checks are skipped, saying why.
Exit status: 0 when nothing failed, 1 when a check failed, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (gpu_check.json, gpu_check.md, logs/, run folders)")
    p.add_argument("--quick", action="store_true", help="fewer timed steps: under 4 minutes")
    p.add_argument("--dry-run", action="store_true", help="build every check's configuration and list them")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: run the checks' logic on tiny sizes through the CUDA emulation (no GPU)")
    p.add_argument("--only", help="comma-separated groups: train,throughput,packed_attention,transformer_engine,dali")
    p.add_argument("--budget", type=float,
                   help="seconds for the whole run (default 450, 220 with --quick): no group starts with under "
                        "20 s left and each group stops at what is left")
    p.add_argument("--data-root", help="demo data (tools/make_demo_data.py) for the loader-wait check; "
                                       "default: mock rows")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    from megatron_omni.gpu_check.context import CheckContext
    from megatron_omni.gpu_check.runner import plan_all, run_all, select_groups

    try:
        groups = select_groups([g.strip() for g in args.only.split(",")] if args.only else None)
    except ValueError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    ctx = CheckContext(out=out, device=args.device, quick=args.quick, dry_run=args.dry_run,
                       data_root=os.path.abspath(args.data_root) if args.data_root else None)
    os.makedirs(out, exist_ok=True)
    if args.dry_run:
        planned = plan_all(ctx, groups)
        with open(os.path.join(out, "gpu_check_plan.json"), "w") as f:
            json.dump({"groups": groups, "checks": planned}, f, indent=1, default=str)
        for name, spec in planned.items():
            skip = spec.get("skip_reason")
            print(f"{spec['group']:>18} / {name}: limit {spec['time_limit_s']} s"
                  + (f" (would skip: {skip})" if skip else ""))
        print(f"gpu_check: dry run, {len(planned)} checks planned; {os.path.join(out, 'gpu_check_plan.json')}")
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device; use --device cpu (logic on tiny sizes) or --dry-run",
              file=sys.stderr)
        return 2
    report = run_all(ctx, groups, argv=raw, budget_s=args.budget)
    s = report["summary"]
    print(f"gpu_check: {s['pass']} pass, {s['fail']} fail, {s['skipped']} skipped in {report['seconds']:.0f} s; "
          f"{os.path.join(out, 'gpu_check.md')}")
    return 1 if s["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
