#!/usr/bin/env python
"""Plan a training layout for a model on a GPU cluster (thin CLI over megatron_omni.planner).

    python tools/plan.py --model configs/model/llama3_70b.yaml --gpus 64 --gpu h100 \
        --seq-len 8192 --global-batch 256 --precision fp8 [--json] [--top 10]
    python tools/plan.py ... --layout tp=4,pp=8,vpp=5[,cp=1,mbs=1,recompute=none]

Enumerates TP/PP/VPP/CP/DP/EP, micro-batch and recompute choices, drops the layouts
megatron would reject (config.validate) or that do not fit in memory, and ranks the rest
by predicted tokens/s/GPU.  `--layout` prices one layout (reported even if it does not
fit).  Predictions for published Llama-3 runs are printed beside their measurements.
`--json` prints one JSON object on stdout: {"flops_per_token", "layouts": [...], ...}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_omni.config.loader import ConfigError  # noqa: E402
from megatron_omni.planner import anchors as anchor_table  # noqa: E402
from megatron_omni.planner.cluster import GPUS, make_cluster  # noqa: E402
from megatron_omni.planner.layout import Job, check_layout, parse_layout  # noqa: E402
from megatron_omni.planner.memory import MemoryAssumptions, param_counts  # noqa: E402
from megatron_omni.planner.search import DEFAULT_HEADROOM, Assumptions, evaluate, search  # noqa: E402
from megatron_omni.planner.timing import Efficiency, Overlap  # noqa: E402
from megatron_omni.training import flops as F  # noqa: E402

log = logging.getLogger("plan")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Rank parallel layouts for a model on a GPU cluster.")
    p.add_argument("--model", required=True, help="model config YAML (configs/model/*.yaml)")
    p.add_argument("--gpus", type=int, help="total GPUs (or give --nodes)")
    p.add_argument("--nodes", type=int, help="nodes of --gpus-per-node GPUs")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per NVLink domain (default 8)")
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    p.add_argument("--ib-gbps", type=float, help="scale-out bandwidth per GPU in Gb/s (default: 400, A100 200)")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--global-batch", type=int, required=True, help="sequences per optimizer step")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp8"))
    p.add_argument("--layout", help="price only this layout, e.g. tp=4,pp=8,vpp=5[,cp=2,mbs=1,recompute=none]")
    p.add_argument("--top", type=int, default=10, help="layouts to list (0 = all feasible)")
    p.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM,
                   help=f"usable fraction of GPU memory (default {DEFAULT_HEADROOM})")
    p.add_argument("--bf16-grads", action="store_true",
                   help="bf16 gradient buffer (grad_reduce_in_fp32=False, as the Megatron-Bridge recipes); "
                        "default fp32 as megatron-omni trains")
    p.add_argument("--no-tp-overlap", action="store_true",
                   help="no TE userbuffer TP-communication overlap (forward TP collectives exposed)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return p


def _assumptions(args) -> Assumptions:
    overlap = Overlap(tp=0.5) if args.no_tp_overlap else Overlap()
    return Assumptions(
        efficiency=Efficiency(),
        overlap=overlap,
        memory=MemoryAssumptions(grad_fp32=not args.bf16_grads),
        headroom=args.headroom,
    )


def _describe_assumptions(a: Assumptions) -> Dict:
    return {
        "efficiency_of_dense_peak": dataclasses.asdict(a.efficiency),
        "exposed_comm_fraction": dataclasses.asdict(a.overlap),
        "memory": dataclasses.asdict(a.memory),
        "headroom": a.headroom,
        "sequence_parallel": "on whenever tp > 1",
        "distributed_optimizer": "sharded over dp*cp; overlap_grad_reduce and overlap_param_gather on",
        "rank_order": "tp-cp-ep-dp-pp (megatron default)",
        "mfu": "model TFLOP/s per GPU / dense peak of --precision (the FP8 peak for fp8), as training/flops.mfu",
    }


def _fmt_layout_row(i: int, d: Dict, gpu_mem: float) -> str:
    vpp = "-" if d["vpp"] is None else str(d["vpp"])
    mfu = "-" if d["mfu"] is None else f"{100 * d['mfu']:.1f}%"
    t = d["time"]
    bubble = 100 * t["bubble_s"] / t["step_s"]
    comm = 100 * (t["tp_s"] + t["cp_s"] + t["pp_s"] + t["dp_s"]) / t["step_s"]
    fits = "" if d["fits"] else "  (does not fit)"
    return (f"{i:>3}  {d['tp']:>2} {d['pp']:>3} {vpp:>3} {d['cp']:>2} {d['dp']:>4} {d['ep']:>2} "
            f"{d['micro_batch']:>3} {d['recompute']:>9}  {d['memory_gib_per_gpu']:>6.1f} "
            f"({100 * d['memory_gib_per_gpu'] / gpu_mem:>3.0f}%)  {d['tokens_per_s_per_gpu']:>9.0f} "
            f"{d['tflops_per_gpu']:>7.0f} {mfu:>6}  {d['step_time_s']:>7.2f}  {bubble:>5.1f}% {comm:>5.1f}%{fits}")


def _print_table(report: Dict, gpu_mem: float) -> None:
    j = report["job"]
    c = report["cluster"]
    eff = report["assumptions"]["efficiency_of_dense_peak"]
    print(f"Model {report['model']}: {j['params'] / 1e9:.2f}B params, {report['flops_per_token']:.3e} FLOPs/token "
          f"at seq {j['seq_len']} (Megatron-LM formula)")
    print(f"Cluster: {c['num_gpus']} x {c['gpu']} ({c['gpus_per_node']}/node, {gpu_mem:.1f} GiB, "
          f"NVLink {c['nvlink_gb_s']:.0f} GB/s, IB {c['ib_gb_s']:.0f} GB/s per GPU); "
          f"GBS {j['global_batch']}, {j['precision']}")
    print(f"Compute efficiency used: bf16 {eff['bf16']:.2f} of the dense BF16 peak, fp8 GEMMs {eff['fp8']:.2f} "
          f"of the FP8 peak (fitted to the calibration anchors below); memory headroom "
          f"{report['assumptions']['headroom']:.2f}")
    s = report.get("search")
    if s:
        print(f"Searched {s['candidates']} combinations: {s['rejected']} rejected by megatron's rules, "
              f"{s['over_memory']} over memory, {s['feasible']} feasible.")
    print()
    print("  #  tp  pp vpp cp   dp ep mbs recompute  mem GiB (GPU%)  tok/s/GPU TFLOP/s    MFU   step s  bubble  comm")
    if not report["layouts"]:
        print("  (no layout fits; closest by memory:)")
        for i, d in enumerate(report.get("closest", []), 1):
            print(_fmt_layout_row(i, d, gpu_mem))
    for i, d in enumerate(report["layouts"], 1):
        print(_fmt_layout_row(i, d, gpu_mem))
    print()
    print("Anchors (published measurement vs this model's prediction for the same run):")
    for a in report["anchors"]:
        kind = "calibration" if a["calibration"] else "held-out"
        if a["metric"] == "mfu":
            pred, meas = f"{100 * a['predicted']:.1f}% MFU", f"{100 * a['measured']:.1f}% MFU"
        else:
            pred, meas = f"{a['predicted']:.0f} tok/s/GPU", f"{a['measured']:.0f} tok/s/GPU"
        extra = f"; predicted {a['predicted_tflops_per_gpu']:.0f} TFLOP/s/GPU"
        if a["measured_tflops_per_gpu"]:
            extra += f" vs measured {a['measured_tflops_per_gpu']:.0f}"
        ok = "ok" if a["within_tolerance"] else "OUTSIDE"
        print(f"  [{kind}] {a['name']} ({a['source']}): predicted {pred}, measured {meas}, "
              f"ratio {a['ratio']:.3f} ({ok}, tol {100 * a['tolerance']:.0f}%){extra}")


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.gpus is None and args.nodes is None:
            raise ConfigError("give --gpus or --nodes")
        num_gpus = args.gpus if args.gpus is not None else args.nodes * args.gpus_per_node
        cluster = make_cluster(args.gpu, num_gpus, args.gpus_per_node,
                               None if args.ib_gbps is None else args.ib_gbps / 8)
        cluster.gpu.peak_tflops(args.precision)  # e.g. no FP8 on A100
        model = anchor_table.load_model(args.model)
        job = Job(model, args.seq_len, args.global_batch, args.precision)
    except (ConfigError, ValueError, OSError) as e:
        print(f"plan.py: error: {e}", file=sys.stderr)
        return 2
    assumptions = _assumptions(args)

    report: Dict = {
        "model": args.model,
        "cluster": {"gpu": cluster.gpu.name, "num_gpus": cluster.num_gpus, "gpus_per_node": cluster.gpus_per_node,
                    "memory_gib": cluster.gpu.memory_gib, "nvlink_gb_s": cluster.gpu.nvlink_gb_s,
                    "ib_gb_s": cluster.gpu.ib_gb_s},
        "job": {"seq_len": job.seq_len, "global_batch": job.global_batch, "precision": job.precision,
                "params": param_counts(model).total},
        # Megatron-LM model FLOPs per token at tp=1 (each layout also reports its own, with its
        # TP-padded vocabulary).
        "flops_per_token": F.flops_per_token(model, job.seq_len),
        "assumptions": _describe_assumptions(assumptions),
    }

    if args.layout:
        try:
            layout = parse_layout(args.layout, cluster.num_gpus)
            check_layout(job, layout, cluster.num_gpus)
        except ConfigError as e:
            print(f"plan.py: error: invalid layout '{args.layout}': {e}", file=sys.stderr)
            return 2
        est = evaluate(job, layout, cluster, assumptions)
        report["layouts"] = [est.as_dict()]
        if not est.fits:
            log.warning("layout %s needs %.1f GiB per GPU, over %.0f%% of %.1f GiB", layout.describe(),
                        est.memory.total_gib, 100 * assumptions.headroom, cluster.gpu.memory_gib)
    else:
        result = search(job, cluster, assumptions)
        ranked = result.feasible if args.top <= 0 else result.feasible[: args.top]
        report["layouts"] = [e.as_dict() for e in ranked]
        report["search"] = {
            "candidates": len(result.feasible) + len(result.infeasible) + result.rejected,
            "rejected": result.rejected, "over_memory": len(result.infeasible), "feasible": len(result.feasible),
        }
        if not result.feasible:
            report["closest"] = [e.as_dict() for e in result.infeasible[:3]]
            log.warning("no layout fits in %.0f%% of %.1f GiB per GPU; smallest needs %.1f GiB",
                        100 * assumptions.headroom, cluster.gpu.memory_gib,
                        result.infeasible[0].memory.total_gib if result.infeasible else float("nan"))

    report["anchors"] = anchor_table.compare_all()

    if args.json:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        _print_table(report, cluster.gpu.memory_gib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
