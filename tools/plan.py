#!/usr/bin/env python
"""Plan a training layout for a model on a GPU cluster (thin CLI over megatron_omni.planner).

    python tools/plan.py --model configs/model/llama3_70b.yaml --gpus 64 --gpu h100 \
        --seq-len 8192 --global-batch 256 --precision fp8 [--json] [--top 10]
    python tools/plan.py ... --layout tp=4,pp=8,vpp=5[,cp=1,mbs=1,recompute=none]
    python tools/plan.py --model configs/m2omni_72b/stages/pt3.yaml --nodes 16 [--media-fraction image=0.8]

--model takes a model config (configs/model/*.yaml), an omni model bundle
(configs/model/m2omni_72b.yaml: `model` + `omni`) or a stage/run config
(configs/m2omni_72b/stages/pt3.yaml), whose sequence length, global batch, precision,
frozen modules, LoRA, modality plan and Table 2 media limits the plan then uses (flags win).
For omni models the encoders are priced on the first pipeline stage and each 1F1B layout
gets the first-stage layer count (`first`, parallel.first_stage_num_layers) that balances it.

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
from megatron_omni.planner import jobs  # noqa: E402
from megatron_omni.planner.chain import plan_chain  # noqa: E402
from megatron_omni.planner.omni import MediaAssumptions, encoder_params  # noqa: E402
from megatron_omni.planner.search import DEFAULT_HEADROOM, Assumptions, evaluate, search  # noqa: E402
from megatron_omni.planner.timing import Efficiency, Overlap  # noqa: E402
from megatron_omni.training import flops as F  # noqa: E402

log = logging.getLogger("plan")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Rank parallel layouts for a model on a GPU cluster.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", "--config", dest="model",
                      help="model config, omni model bundle, or stage/run config YAML")
    what.add_argument("--chain", nargs="+", metavar="STAGE_CONFIG",
                      help="stage configs of a chain (e.g. configs/m2omni_72b/stages/{pt1,...,at}.yaml): "
                           "rank the layouts that fit every stage by their worst stage's speed")
    p.add_argument("--gpus", type=int, help="total GPUs (or give --nodes)")
    p.add_argument("--nodes", type=int, help="nodes of --gpus-per-node GPUs")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per NVLink domain (default 8)")
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    p.add_argument("--ib-gbps", type=float, help="scale-out bandwidth per GPU in Gb/s (default: 400, A100 200)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the run config's, else 8192)")
    p.add_argument("--global-batch", type=int,
                   help="sequences per optimizer step (default: the run config's train.global_batch_size)")
    p.add_argument("--precision", choices=("bf16", "fp8"), help="default: the run config's, else bf16")
    p.add_argument("--media-fraction", help="omni: share of a packed row's tokens that are media, per modality, "
                                            "e.g. image=0.75,video=0.85,audio=0.5 (the defaults)")
    p.add_argument("--audio-seconds", type=float, help="omni: length of one audio clip (default 30)")
    p.add_argument("--text-sample-tokens", type=int,
                   help="omni: length of one sample in a packed text row (attention is sum L_i^2 over the row's "
                        "samples; default: the whole row is one sample, the upper bound)")
    p.add_argument("--media-from-data", action="store_true",
                   help="omni stage config: measure the media share of packed rows and the audio clip length on "
                        "the stage's data (data.root, data.omni_blend) instead of assuming them")
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
    p.add_argument("overrides", nargs="*", help="config overrides for a run config, e.g. omni.freeze=[llm]")
    return p


def _media(args, path: str) -> MediaAssumptions:
    """Media per row: measured on the stage's data (--media-from-data), else the defaults; the
    --media-fraction / --audio-seconds flags win over both."""
    base = MediaAssumptions()
    if args.media_from_data:
        from megatron_omni.config.loader import load_config
        from megatron_omni.planner.media_stats import measure_media

        base = measure_media(load_config(path, args.overrides))
    fractions = dict(base.media_fraction)
    for item in (args.media_fraction or "").split(","):
        if not item.strip():
            continue
        key, _, value = item.partition("=")
        try:
            fractions[key.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--media-fraction item {item!r} must look like image=0.75") from None
    seconds = base.audio_seconds if args.audio_seconds is None else args.audio_seconds
    return MediaAssumptions(media_fraction=fractions, audio_seconds=seconds, source=base.source,
                            text_sample_tokens=args.text_sample_tokens)


def load_job(args, path: Optional[str] = None) -> Job:
    return jobs.load_job(path or args.model, args.overrides, seq_len=args.seq_len, global_batch=args.global_batch,
                         precision=args.precision, media=_media(args, path or args.model))


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
    first = "-" if d["first_stage_layers"] is None else str(d["first_stage_layers"])
    recompute = d["recompute"] + ("+enc" if d["encoder_recompute"] else "")
    mfu = "-" if d["mfu"] is None else f"{100 * d['mfu']:.1f}%"
    t = d["time"]
    bubble = 100 * t["bubble_s"] / t["step_s"]
    comm = 100 * (t["tp_s"] + t["cp_s"] + t["pp_s"] + t["dp_s"]) / t["step_s"]
    fits = "" if d["fits"] else "  (does not fit)"
    return (f"{i:>3}  {d['tp']:>2} {d['pp']:>3} {vpp:>3} {first:>3} {d['cp']:>2} {d['dp']:>4} {d['ep']:>2} "
            f"{d['micro_batch']:>3} {recompute:>14}  {d['memory_gib_per_gpu']:>6.1f} "
            f"({100 * d['memory_gib_per_gpu'] / gpu_mem:>3.0f}%)  {d['tokens_per_s_per_gpu']:>9.0f} "
            f"{d['tflops_per_gpu']:>7.0f} {mfu:>6}  {d['step_time_s']:>7.2f}  {bubble:>5.1f}% {comm:>5.1f}%{fits}")


def _print_table(report: Dict, gpu_mem: float) -> None:
    j = report["job"]
    c = report["cluster"]
    eff = report["assumptions"]["efficiency_of_dense_peak"]
    print(f"Model {report['model']}: {j['params'] / 1e9:.2f}B params, {report['flops_per_token']:.3e} FLOPs/token "
          f"at seq {j['seq_len']} (Megatron-LM formula, one unpacked sequence per row)")
    print(f"Cluster: {c['num_gpus']} x {c['gpu']} ({c['gpus_per_node']}/node, {gpu_mem:.1f} GiB, "
          f"NVLink {c['nvlink_gb_s']:.0f} GB/s, IB {c['ib_gb_s']:.0f} GB/s per GPU); "
          f"GBS {j['global_batch']}, {j['precision']}")
    print(f"Compute efficiency used: bf16 {eff['bf16']:.2f} of the dense BF16 peak, fp8 GEMMs {eff['fp8']:.2f} "
          f"of the FP8 peak (fitted to the calibration anchors below); memory headroom "
          f"{report['assumptions']['headroom']:.2f}")
    o = report.get("omni")
    if o:
        enc = ", ".join(f"{m} {n / 1e6:.0f}M" for m, n in o["encoder_params"].items() if n)
        print(f"Omni stage {o['stage']}: trains {', '.join(o['trainable']) or 'nothing'}"
              f"{' + LoRA ' + str(o['lora_fraction']) if o['lora_fraction'] else ''}; encoders on rank 0: {enc}")
        shares = o.get("modality_shares")
        mix = ", ".join(f"{m} {100 * v:.0f}%" for m, v in shares.items()) if shares else "-"
        print(f"  microbatch mix ({o['scheduler_mode']}): {mix}; Table 2 limits: {o['max_image_tokens']} image "
              f"tokens, {o['max_video_frames']} video frames ({o['max_video_tokens'] or o['max_image_tokens']} tokens a clip)")
        media = ", ".join(f"{m} {v:.2f}" for m, v in o["media_fraction"].items())
        text = o["text_sample_tokens"] or "the whole row"
        print(f"  media share of a row: {media}, audio clips {o['audio_seconds']:.1f} s, text rows: samples of "
              f"{text} tokens ({o['media_source']}; "
              f"--media-from-data, --media-fraction, --audio-seconds, --text-sample-tokens); '1st' = decoder layers "
              f"on the encoders' stage (parallel.first_stage_num_layers), '+enc' = encoder recompute")
    s = report.get("search")
    if s:
        print(f"Searched {s['candidates']} combinations: {s['rejected']} rejected by megatron's rules, "
              f"{s['over_memory']} over memory, {s['feasible']} feasible.")
    print()
    print("  #  tp  pp vpp 1st cp   dp ep mbs      recompute  mem GiB (GPU%)  tok/s/GPU TFLOP/s    MFU   step s  bubble  comm")
    if not report["layouts"]:
        print("  (no layout fits; closest by memory:)")
        for i, d in enumerate(report.get("closest", []), 1):
            print(_fmt_layout_row(i, d, gpu_mem))
    for i, d in enumerate(report["layouts"], 1):
        print(_fmt_layout_row(i, d, gpu_mem))
    if report["layouts"]:
        print(f"\nLaunch #1 with: {' '.join(report['layouts'][0]['overrides'])}")
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


def _stage_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def main_chain(args, cluster) -> int:
    try:
        stages = {_stage_name(p): load_job(args, p) for p in args.chain}
        layouts = plan_chain(stages, cluster, _assumptions(args))
    except (ConfigError, ValueError, OSError) as e:
        print(f"plan.py: error: {e}", file=sys.stderr)
        return 2
    top = layouts if args.top <= 0 else layouts[: args.top]
    report = {"chain": args.chain, "cluster": {"gpu": cluster.gpu.name, "num_gpus": cluster.num_gpus},
              "layouts": [c.as_dict() for c in top]}
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    print(f"Chain of {len(stages)} stages on {cluster.num_gpus} x {cluster.gpu.name}: layouts that fit every "
          f"stage, ranked by the worst stage's tokens/s relative to that stage's own best layout")
    if not top:
        print("  (no single layout fits every stage; plan the stages one by one with --model)")
        return 0
    for i, c in enumerate(top, 1):
        print(f"\n{i}. {c.layout.describe()}  (worst stage at {100 * c.worst_ratio:.1f}% of its best)")
        for stage, e in c.estimates.items():
            mfu = "-" if e.mfu is None else f"{100 * e.mfu:.1f}%"
            print(f"   {stage:>6}: {e.memory.total_gib:5.1f} GiB  {e.tokens_per_s_per_gpu:8.0f} tok/s/GPU  MFU {mfu:>6}"
                  f"  ({100 * c.ratio(stage):.1f}% of {c.best[stage].layout.describe()})")
    print(f"\nLaunch #1 with: {' '.join(report['layouts'][0]['overrides'])}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.gpus is None and args.nodes is None:
            raise ConfigError("give --gpus or --nodes")
        num_gpus = args.gpus if args.gpus is not None else args.nodes * args.gpus_per_node
        cluster = make_cluster(args.gpu, num_gpus, args.gpus_per_node,
                               None if args.ib_gbps is None else args.ib_gbps / 8)
        if args.chain:
            return main_chain(args, cluster)
        job = load_job(args)
        model = job.model
        cluster.gpu.peak_tflops(job.precision)  # e.g. no FP8 on A100
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
        # Megatron-LM model FLOPs per token at tp=1, one unpacked sequence per row (each layout also
        # reports its own, with its TP-padded vocabulary and, for omni rows, packed samples' sum L_i^2
        # attention and the encoders).
        "flops_per_token": F.flops_per_token(model, job.seq_len),
        "assumptions": _describe_assumptions(assumptions),
    }
    if job.omni is not None:
        encoders = encoder_params(job.omni.omni)
        report["job"]["params"] += sum(c.tp_split + c.replicated for c in encoders.values())
        report["omni"] = {
            **job.omni.describe(),
            "trainable": [m for m in ("llm", *encoders) if job.omni.trainable(m)],
            "encoder_params": {m: c.tp_split + c.replicated for m, c in encoders.items()},
            "placement": "encoders and connectors on pipeline rank 0 (first virtual stage)",
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

    if job.omni is not None and report["layouts"]:
        best = report["layouts"][0]
        report["omni"]["modality_shares"] = job.omni.modality_shares(best["num_microbatches"])
    report["anchors"] = anchor_table.compare_all()

    if args.json:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        _print_table(report, cluster.gpu.memory_gib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
