#!/usr/bin/env python
"""Balance ablation (paper Tables 11-12 in miniature): the tiny omni model trained under each
modality-round mode -- random (Eq. 3), round_robin (Eq. 4), accumulation (Eq. 5/7) -- and
accumulation with dynamic adaptive balance (Sec. 3.2), same data, seed and steps.

    python tools/balance_ablation.py --data runs/demo_data --out runs/balance_ablation \
        [--steps 24] [--nproc 1] [section.key=value ...]

Each variant is one `megatron_omni.train` run of configs/tiny/pt_stage3.yaml with a `balance`
override; the per-modality validation losses (every train.eval_interval steps, held-out
samples) are collected into `table.md` (final validation loss per modality and mode, and their
mean) and `val_loss_<modality>.png` (curves per mode).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODALITIES = "[image, video, audio, text]"
VARIANTS: Dict[str, str] = {
    "random": "{mode: random, modalities: %s, pure_text_share: 0.25, "
              "data_volumes: {image: 36, video: 6, audio: 18, text: 24}}" % MODALITIES,
    "round_robin": "{mode: round_robin, modalities: %s, pure_text_share: 0.25}" % MODALITIES,
    "accumulation": "{mode: accumulation, modalities: %s, pure_text_share: 0.25}" % MODALITIES,
    "accumulation+adaptive": "{mode: accumulation, modalities: %s, pure_text_share: 0.25, "
                             "adaptive: {enabled: true, window: 2}}" % MODALITIES,
}


def run_variant(name: str, balance: str, args, extra: List[str]) -> List[dict]:
    out = os.path.join(args.out, name.replace("+", "_"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "megatron_omni.train", "--config", "configs/tiny/pt_stage3.yaml", f"data.root={args.data}",
           f"balance={balance}", f"train.steps={args.steps}", f"train.eval_interval={args.eval_interval}",
           f"train.output_dir={out}", f"train.load={out}/checkpoints", f"train.save_interval={args.steps}", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)}
    print(f"== {name}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="demo data root (python tools/make_demo_data.py --out DIR)")
    p.add_argument("--out", default="runs/balance_ablation")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--eval-interval", type=int, default=4)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from megatron_omni.profiling.charts import line_chart

    curves: Dict[str, Dict[str, List]] = {}
    for name, balance in VARIANTS.items():
        rows = [r for r in run_variant(name, balance, args, args.overrides) if "val_losses" in r]
        curves[name] = {"steps": [r["step"] for r in rows], "val": [r["val_losses"] for r in rows]}
    modalities = sorted({m for c in curves.values() for v in c["val"] for m in v})
    lines = [f"Final validation loss per modality after {args.steps} steps (held-out samples; lower is better)", "",
             "| mode | " + " | ".join(modalities) + " | mean |", "|---" * (len(modalities) + 2) + "|"]
    for name, c in curves.items():
        last = c["val"][-1]
        vals = [last.get(m) for m in modalities]
        mean = sum(v for v in vals if v is not None) / max(1, sum(v is not None for v in vals))
        lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" if v is not None else "-" for v in vals)
                     + f" | {mean:.4f} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    print(table)
    for m in modalities:
        series = [(name, [v.get(m, float("nan")) for v in c["val"]]) for name, c in curves.items()]
        xs = next(iter(curves.values()))["steps"]
        line_chart(os.path.join(args.out, f"val_loss_{m}.png"), xs, series,
                   title=f"{m}: validation loss per balance mode", xlabel="step", ylabel="val loss")
    print(f"wrote {args.out}/table.md and val_loss_<modality>.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
