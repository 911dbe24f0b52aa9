#!/usr/bin/env python
"""One-command proof that a megatron-omni checkpoint and an HF model compute the same function.

    python tools/compare_hf.py --hf-dir Llama-3.2-1B --load ckpt/llama32_1b --tp 2 --pp 2

Runs transformers' model (fp32, eager attention, CPU) and tools/forward.py (torchrun, tp*pp
ranks, fp32) on the same random token ids (or --input-ids), then prints max|d| and mean|d|
of the logits, per-position cosine similarity (min and mean), top-1 agreement and top-5
overlap.  Exits 1 when a threshold is missed (defaults: min cosine >= 0.9999, top-1 >= 0.99,
top-5 overlap >= 0.99; --max-abs adds an absolute bound), 0 otherwise.  The last line of
output is `RESULT {json}` for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--load", required=True, help="megatron-omni checkpoints root (or iter_ folder)")
    p.add_argument("--model", default=None, help="ModelConfig YAML (default: found next to the checkpoint)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--input-ids", default=None, help="int64 [B, S] .npy (default: random ids)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-cosine", type=float, default=0.9999)
    p.add_argument("--min-top1", type=float, default=0.99)
    p.add_argument("--min-top5", type=float, default=0.99)
    p.add_argument("--max-abs", type=float, default=None)
    p.add_argument("--keep", default=None, help="keep ids.npy / hf_logits.npy / mcore_logits.npy in this folder")
    return p.parse_args(argv)


def compare(hf, mc) -> Dict[str, float]:
    """Agreement statistics of two logit arrays [B, S, V] (numpy, float32)."""
    import numpy as np

    a = hf.reshape(-1, hf.shape[-1]).astype(np.float64)
    b = mc.reshape(-1, mc.shape[-1]).astype(np.float64)
    diff = np.abs(a - b)
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
    top5_a = np.argsort(-a, axis=-1)[:, :5]
    top5_b = np.argsort(-b, axis=-1)[:, :5]
    overlap = [len(set(x) & set(y)) / 5.0 for x, y in zip(top5_a, top5_b)]
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "max_abs_logit": float(np.abs(a).max()),
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "top1": float((a.argmax(-1) == b.argmax(-1)).mean()),
        "top5": float(np.mean(overlap)),
        "positions": int(a.shape[0]),
    }


def hf_logits(hf_dir: str, ids):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    except TypeError:  # transformers 4.x
        model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.float().numpy()


def mcore_logits(load: str, ids_path: str, out_path: str, tp: int, pp: int, model: Optional[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp * pp}",
           os.path.join(REPO, "tools", "forward.py"), "--load", load, "--input-ids", ids_path, "--output", out_path,
           f"parallel.tp={tp}", f"parallel.pp={pp}"]
    if model:
        cmd[cmd.index("--load"):cmd.index("--load")] = ["--model", model]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"tools/forward.py failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")


def main(argv: Optional[List[str]] = None) -> int:
    import numpy as np

    args = parse_args(argv)
    work = args.keep or tempfile.mkdtemp(prefix="compare_hf-")
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(args.hf_dir, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    if args.input_ids:
        ids = np.load(args.input_ids).astype(np.int64)
    else:
        ids = np.random.default_rng(args.seed).integers(0, vocab, size=(args.batch, args.seq), dtype=np.int64)
    ids_path = os.path.join(work, "ids.npy")
    np.save(ids_path, ids)
    mc_path = os.path.join(work, "mcore_logits.npy")
    mcore_logits(args.load, ids_path, mc_path, args.tp, args.pp, args.model)
    hf = hf_logits(args.hf_dir, ids)
    mc = np.load(mc_path)
    if args.keep:
        np.save(os.path.join(work, "hf_logits.npy"), hf)
    if hf.shape != mc.shape:
        print(f"shape mismatch: HF logits {list(hf.shape)} vs megatron {list(mc.shape)}")
        return 1
    stats = compare(hf, mc)
    checks = {
        "cosine_min": stats["cosine_min"] >= args.min_cosine,
        "top1": stats["top1"] >= args.min_top1,
        "top5": stats["top5"] >= args.min_top5,
    }
    if args.max_abs is not None:
        checks["max_abs"] = stats["max_abs"] <= args.max_abs
    print(f"HF {args.hf_dir}  vs  megatron {args.load} (tp={args.tp} pp={args.pp}), "
          f"{ids.shape[0]}x{ids.shape[1]} tokens, fp32")
    print(f"  max|d| {stats['max_abs']:.3e}  mean|d| {stats['mean_abs']:.3e}  (max |logit| {stats['max_abs_logit']:.3g})")
    print(f"  cosine min {stats['cosine_min']:.8f}  mean {stats['cosine_mean']:.8f}")
    print(f"  top-1 agreement {stats['top1']:.4f}  top-5 overlap {stats['top5']:.4f}")
    failed = [k for k, ok in checks.items() if not ok]
    print("FAIL: " + ", ".join(failed) if failed else "PASS")
    print("RESULT " + json.dumps({**stats, "pass": not failed, "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
