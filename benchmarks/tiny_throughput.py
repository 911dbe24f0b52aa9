"""Throughput of the whole tiny run: TP2 x PP2 (4 ranks) against TP1 (1 rank), same global batch.

    python benchmarks/tiny_throughput.py [--config configs/tiny/llm.yaml] [--steps 20] [--warmup 3]
        [--out runs/bench_tiny_throughput] [section.key=value ...]
    python benchmarks/tiny_throughput.py --config configs/tiny/omni_mock.yaml   # the tiny omni run
    python benchmarks/tiny_throughput.py --config configs/tiny/pt_stage3.yaml data.root=runs/demo_data

Each layout runs tools/profile_throughput.py under torchrun (same config, same global
batch, so the same tokens per step); prints tokens/s, TFLOP/s/GPU, the profiler's time
split per pipeline stage and communication breakdown, and the ratio of the two.  An omni
config adds tokens/s per modality and the encoders' share of the FLOPs (TFLOP/s/GPU counts
the encoders; "LLM only" is the decoder alone).  On
CPU the ranks are emulated and share the machine's cores, so the parallel run is
expected to be *slower* per token: the ratio measures the parallelism's overheads
(p2p, TP all-reduces, bubble), not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = {
    "tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
    "tp1": (1, ["parallel.tp=1", "parallel.pp=1"]),
}


def run_layout(name: str, nproc: int, layout: Sequence[str], args, extra: Sequence[str]) -> Dict:
    out = os.path.join(args.out, name)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "tools/profile_throughput.py", "--config", args.config, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--out", out,
           f"data.cache_dir={os.path.join(args.out, 'data_cache')}", *layout, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)}
    print(f"== {name}: {' '.join(cmd[3:])}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    with open(os.path.join(out, "profile.json")) as f:
        return json.load(f)


def describe(name: str, s: Dict) -> List[str]:
    thr, st, b = s["throughput"], s["step_time_ms"], s["bubble"]
    m = s["meta"]
    lines = [
        f"{name}: TP{m['tp']} x PP{m['pp']} x DP{m['dp']} on {m['world']} rank(s), GBS {m['global_batch_size']} "
        f"x seq {m['seq_length']} ({m['num_microbatches']} microbatches)",
        f"  tokens/s {thr['tokens_per_s']:,.0f} | tokens/s/GPU {thr['tokens_per_s_per_gpu']:,.0f} | "
        f"TFLOP/s/GPU {thr['tflops_per_gpu']:.4f} | MFU "
        + ("n/a (cpu)" if thr["mfu"] is None else f"{100 * thr['mfu']:.1f}%"),
        f"  step ms: mean {st['mean']:.1f} | p50 {st['p50']:.1f} | max {st['max']:.1f} "
        f"(steps {s['measured_steps'][0]}..{s['measured_steps'][-1]})",
    ]
    if s.get("modalities"):
        lines.append(f"  FLOPs/step {thr['flops_per_step']:.3e} = LLM {thr['llm_flops_per_step']:.3e} + encoders "
                     f"{thr['encoder_flops_per_step']:.3e} ({100 * thr['encoder_flops_share']:.1f}%); LLM only "
                     f"{thr['llm_tflops_per_gpu']:.4f} TFLOP/s/GPU")
        lines.append("  tokens/s per modality (encoder share of its FLOPs): " + " | ".join(
            f"{r['modality']} {r['tokens_per_s']:,.0f} ({100 * r['encoder_share']:.1f}%)" for r in s["modalities"]))
    for stage in s["stages"]:
        sp = stage["split"]
        lines.append(
            f"  PP stage {stage['pp']} (ms/step): data {sp['data_wait']:.1f} | fwd {sp['forward']:.1f} | "
            f"bwd {sp['backward']:.1f} | p2p+bubble {sp['pipeline']:.1f} | grad sync {sp['grad_sync']:.1f} | "
            f"optimizer {sp['optimizer']:.1f} | other {sp['other']:.1f} | step {sp['step']:.1f}")
    if b["measured_ms"] is not None:
        lines.append(f"  bubble: measured {b['measured_ms']:.1f} ms ({b['measured_fraction']:.3f} of busiest-stage "
                     f"compute) vs analytic (p-1)/(v*m) = {b['analytic_fraction']:.3f}")
    for r in s["comm_trace"]:
        c = r["comm_ms"]
        lines.append(f"  trace rank {r['rank']} (pp{r['pp']} tp{r['tp']}) comm ms/step: TP {c['tp']:.1f} | "
                     f"PP {c['pp']:.1f} | DP {c['dp']:.1f} | other {c['other']:.1f} | barriers {c['barrier']:.1f}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny/llm.yaml",
                   help="run config; an omni one (configs/tiny/omni_mock.yaml, pt_stage3.yaml) adds "
                        "per-modality numbers")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="runs/bench_tiny_throughput")
    p.add_argument("overrides", nargs="*", help="applied to both layouts, e.g. data.seq_length=64")
    args = p.parse_args(argv)
    results = {name: run_layout(name, nproc, layout, args, args.overrides)
               for name, (nproc, layout) in LAYOUTS.items()}
    print()
    for name, s in results.items():
        print("\n".join(describe(name, s)))
    par, ref = results["tp2_pp2"]["throughput"], results["tp1"]["throughput"]
    ratio = par["tokens_per_s"] / ref["tokens_per_s"]
    print(f"\nratio TP2xPP2 / TP1 tokens/s: {ratio:.3f} (per GPU: "
          f"{par['tokens_per_s_per_gpu'] / ref['tokens_per_s_per_gpu']:.3f})")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"config": args.config, "ratio_tokens_per_s": ratio,
                   **{k: v["throughput"] for k, v in results.items()},
                   "step_time_ms": {k: v["step_time_ms"] for k, v in results.items()},
                   "modalities": {k: v.get("modalities") for k, v in results.items()}}, f, indent=1)
    print(f"reports: {args.out}/{{{','.join(results)}}}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
