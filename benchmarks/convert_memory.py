#!/usr/bin/env python
"""Peak memory of checkpoint conversion, as a ratio to the checkpoint size.

    python benchmarks/convert_memory.py --work /tmp/convert_bench            # ~1.2B Llama-3.2-1B shape, bf16

Writes a synthetic HF LlamaForCausalLM folder with random weights (shard by shard, one tensor
in memory at a time), then runs, each in its own process tree:
  hf-to-mcore  (HF -> megatron checkpoint for --tp/--pp),
  mcore-to-hf  (back to HF),
sampling the summed resident set size (RSS) of the converter and all its children every 20 ms.
Prints one line per step and a JSON summary.  The ratio is peak summed RSS / checkpoint bytes;
streaming keeps it far below 1 (for a 70B model the same absolute overhead is ~1% of the model).
Not run by the tests (minutes and several GB of disk).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# meta-llama/Llama-3.2-1B (1.24B parameters, tied embeddings)
SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)


def write_synthetic_llama(path: str, shape: Dict, shard_bytes: int = 1 << 30) -> int:
    """Random bf16 weights in safetensors shards + index + config; returns the tensor bytes."""
    import torch

    from megatron_omni.convert.hf_folder import write_json, write_safetensors_shards
    from megatron_omni.convert.llama import LLAMA
    from megatron_omni.convert.mapping import Dims

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
           "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192},
           "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16", **shape}
    model = LLAMA.config_from_hf(cfg)
    bindings = LLAMA.bindings(model, Dims.of(model))
    entries = [(n, torch.bfloat16, tuple(s)) for b in bindings for n, s in zip(b.hf_names, b.hf_shapes)]
    gen = torch.Generator().manual_seed(0)

    def tensors():
        for name, dtype, s in entries:
            t = torch.ones(s, dtype=dtype) if name.endswith("norm.weight") else \
                (torch.randn(s, generator=gen) * 0.02).to(dtype)
            yield name, t

    os.makedirs(path, exist_ok=True)
    write_safetensors_shards(path, entries, tensors(), shard_bytes)
    write_json(os.path.join(path, "config.json"), cfg)
    return sum(torch.Size(s).numel() * 2 for _, _, s in entries)


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_measured(cmd: List[str]) -> Dict[str, float]:
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.02)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out[-3000:]}\n{err[-3000:]}")
    return {"peak_rss_bytes": peak[0], "seconds": time.time() - start}


BASELINES = {  # what each step loads before it touches a tensor: its fixed cost, whatever the model size
    "hf-to-mcore": "import time, megatron.core, megatron_omni.convert\nfrom megatron_omni.convert import mcore_io\n"
                   "with mcore_io.megatron_world(): time.sleep(1.0)\n",
    "mcore-to-hf": "import time, torch, megatron_omni.convert\ntime.sleep(1.0)\n",
}


def baseline_rss(step: str) -> int:
    return int(run_measured([sys.executable, "-c", BASELINES[step]])["peak_rss_bytes"])


def round_trip_identical(a: str, b: str) -> bool:
    """Every tensor of HF folder `b` equals (dtype and bits) the one of the same name in `a`, and the name sets match."""
    import torch

    from megatron_omni.convert.hf_folder import open_hf_folder

    x, y = open_hf_folder(a), open_hf_folder(b)
    try:
        if set(x.tensors) != set(y.tensors):
            return False
        return all(torch.equal(x.read(n), y.read(n)) and x.tensors[n].dtype == y.tensors[n].dtype for n in x.tensors)
    finally:
        x.close()
        y.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/convert_memory_bench")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    p.add_argument("--keep", action="store_true", help="keep the synthetic model and outputs")
    p.add_argument("--no-verify", action="store_true", help="skip the tensor-by-tensor round-trip comparison")
    args = p.parse_args(argv)
    shape = {**SHAPE, "num_hidden_layers": args.layers}
    hf, mc, back = (os.path.join(args.work, d) for d in ("hf", "mcore", "hf_back"))
    shutil.rmtree(args.work, ignore_errors=True)
    t0 = time.time()
    size = write_synthetic_llama(hf, shape)
    params = size // 2
    print(f"synthetic Llama ({params / 1e9:.2f}B params, bf16): {size / 1e9:.2f} GB in {time.time() - t0:.0f} s")
    tool = os.path.join(REPO, "tools", "convert_checkpoint.py")
    steps = {
        "hf-to-mcore": [sys.executable, tool, "hf-to-mcore", "--hf-dir", hf, "--out", mc, "--tp", str(args.tp),
                        "--pp", str(args.pp)],
        "mcore-to-hf": [sys.executable, tool, "mcore-to-hf", "--load", mc, "--out", back],
    }
    largest = shape["vocab_size"] * shape["hidden_size"] * 2
    results = {"params": params, "checkpoint_bytes": size, "largest_tensor_bytes": largest}
    print(f"largest tensor (embedding): {largest / 1e9:.2f} GB")
    for name, cmd in steps.items():
        base = baseline_rss(name)
        r = run_measured(cmd)
        r["baseline_rss_bytes"] = base
        r["ratio"] = r["peak_rss_bytes"] / size
        r["ratio_above_baseline"] = (r["peak_rss_bytes"] - base) / size
        results[name] = r
        print(f"{name:12s} peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB = {r['ratio']:.3f} x checkpoint; "
              f"fixed cost (imports{', world' if name == 'hf-to-mcore' else ''}) {base / 1e9:.2f} GB, "
              f"above it {(r['peak_rss_bytes'] - base) / 1e9:.2f} GB = {r['ratio_above_baseline']:.3f} x; "
              f"{r['seconds']:.0f} s")
    if not args.no_verify:
        results["round_trip_bit_identical"] = round_trip_identical(hf, back)
        print(f"round trip HF -> megatron -> HF bit-identical: {results['round_trip_bit_identical']}")
    print(json.dumps(results, indent=2))
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
