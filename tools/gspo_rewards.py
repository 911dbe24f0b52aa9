#!/usr/bin/env python
"""The reward curve of a GSPO stage, from its metrics.jsonl: one line per rollout batch.

    python tools/gspo_rewards.py runs/tiny_stages/gspo/metrics.jsonl [--window 4]

Each rollout batch is scored once (its `minibatches` optimizer steps log the same rollout stats),
so the curve is per batch: mean / std of the rewards over all rollouts and per modality, mean
response length, clip fraction of its updates.  Ends with the mean reward of the first and the
last `--window` batches, the number the tiny chain's note reports.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional


def rollout_batches(path: str) -> List[Dict[str, object]]:
    """The metrics rows of a GSPO run merged per rollout batch (in order)."""
    batches: Dict[int, Dict[str, object]] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            row = json.loads(line)
            if "rollout_batch" not in row:
                continue  # validation or other rows
            if row.get("reward_mean") is None:
                raise SystemExit(f"{path}:{n}: a GSPO row without reward_mean; is this a GSPO stage's metrics.jsonl?")
            b = batches.setdefault(int(row["rollout_batch"]), {**row, "steps": [], "clip": []})
            b["steps"].append(row["step"])
            b["clip"].append(row.get("clip_fraction") or 0.0)
    if not batches:
        raise SystemExit(f"{path}: no GSPO rows (rollout_batch / reward_mean); run a GSPO stage first")
    return [batches[k] for k in sorted(batches)]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("metrics", help="a GSPO stage's metrics.jsonl")
    p.add_argument("--window", type=int, default=4, help="rollout batches averaged at each end")
    args = p.parse_args(argv)
    batches = rollout_batches(args.metrics)
    print(f"{'batch':>5} {'steps':>7} {'reward':>7} {'std':>6} {'length':>6} {'clip':>5}  by modality")
    for b in batches:
        steps = b["steps"]
        by_mod = " ".join(f"{m} {v:.3f}" for m, v in sorted(b["reward_mean_by_modality"].items()))
        print(f"{b['rollout_batch']:>5} {f'{steps[0]}-{steps[-1]}':>7} {b['reward_mean']:7.3f} {b['reward_std']:6.3f} "
              f"{b['response_length_mean']:6.2f} {sum(b['clip']) / len(b['clip']):5.2f}  {by_mod}")
    k = min(args.window, max(len(batches) // 2, 1))

    def mean(part):
        return sum(b["reward_mean"] * b["rollouts"] for b in part) / sum(b["rollouts"] for b in part)

    first, last = mean(batches[:k]), mean(batches[-k:])
    print(f"mean reward: first {k} rollout batches {first:.4f}, last {k} {last:.4f} ({last - first:+.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
