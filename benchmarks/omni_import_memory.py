#!/usr/bin/env python
"""Peak memory of `omni-from-hf`, as a ratio to the checkpoint size.

    python benchmarks/omni_import_memory.py --work /tmp/omni_import_bench     # Llama-3.2-1B shape + ViT-600M, bf16

Writes a synthetic HF LlamaForCausalLM folder (benchmarks/convert_memory.py) and a synthetic Qwen2-VL
vision-tower folder of the ViT-600M shape (depth 32, width 1280; random bf16, one tensor in memory at
a time), then runs `omni-from-hf` in its own process tree, sampling the summed RSS every 20 ms.
Prints the peak, the fixed cost (imports + a megatron world) and the ratios.  Not run by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.convert_memory import SHAPE, baseline_rss, run_measured, write_synthetic_llama  # noqa: E402

VIT = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, in_channels=3, patch_size=14, spatial_merge_size=2,
           temporal_patch_size=2)


def write_synthetic_vision(path: str, out_width: int, vit: dict, shard_bytes: int = 1 << 30) -> int:
    """A standalone Qwen2-VL vision-tower folder (Qwen2VLVisionConfig + safetensors); returns its tensor bytes."""
    import torch

    from megatron_omni.convert.hf_folder import write_json, write_safetensors_shards

    e, m = vit["embed_dim"], vit["embed_dim"] * vit["spatial_merge_size"] ** 2
    f = e * vit["mlp_ratio"]
    block = {"norm1.weight": (e,), "norm1.bias": (e,), "attn.qkv.weight": (3 * e, e), "attn.qkv.bias": (3 * e,),
             "attn.proj.weight": (e, e), "attn.proj.bias": (e,), "norm2.weight": (e,), "norm2.bias": (e,),
             "mlp.fc1.weight": (f, e), "mlp.fc1.bias": (f,), "mlp.fc2.weight": (e, f), "mlp.fc2.bias": (e,)}
    shapes = {"patch_embed.proj.weight": (e, vit["in_channels"], vit["temporal_patch_size"], vit["patch_size"],
                                          vit["patch_size"])}
    for i in range(vit["depth"]):
        shapes.update({f"blocks.{i}.{k}": s for k, s in block.items()})
    shapes.update({"merger.ln_q.weight": (e,), "merger.ln_q.bias": (e,), "merger.mlp.0.weight": (m, m),
                   "merger.mlp.0.bias": (m,), "merger.mlp.2.weight": (out_width, m), "merger.mlp.2.bias": (out_width,)})
    entries = [(n, torch.bfloat16, s) for n, s in shapes.items()]
    gen = torch.Generator().manual_seed(1)
    os.makedirs(path, exist_ok=True)
    write_safetensors_shards(path, entries, ((n, (torch.randn(s, generator=gen) * 0.02).to(d)) for n, d, s in entries),
                             shard_bytes)
    write_json(os.path.join(path, "config.json"), {"model_type": "qwen2_vl_vision", "hidden_size": out_width,
                                                   "hidden_act": "quick_gelu", **vit})
    return sum(torch.Size(s).numel() * 2 for _, _, s in entries)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/omni_import_bench")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    shape = {**SHAPE, "num_hidden_layers": args.layers}
    llm, vis, out = (os.path.join(args.work, d) for d in ("llm", "vision", "omni"))
    shutil.rmtree(args.work, ignore_errors=True)
    t0 = time.time()
    size = write_synthetic_llama(llm, shape) + write_synthetic_vision(vis, shape["hidden_size"], VIT)
    print(f"synthetic Llama + ViT-600M (bf16): {size / 1e9:.2f} GB in {time.time() - t0:.0f} s")
    cmd = [sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), "omni-from-hf", "--llm", llm,
           "--vision", vis, "--out", out, "--tp", str(args.tp), "--pp", str(args.pp)]
    base = baseline_rss("hf-to-mcore")
    r = run_measured(cmd)
    written = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(out, "iter_0000000"))
                  for f in fs)
    largest = (shape["vocab_size"] + 17 + 4096) * shape["hidden_size"] * 2  # the omni embedding
    result = {"source_bytes": size, "checkpoint_bytes": written, "largest_tensor_bytes": largest,
              "peak_rss_bytes": r["peak_rss_bytes"], "baseline_rss_bytes": base, "seconds": round(r["seconds"], 1),
              "ratio": r["peak_rss_bytes"] / written, "ratio_above_baseline": (r["peak_rss_bytes"] - base) / written}
    print(f"omni-from-hf peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB = {result['ratio']:.3f} x checkpoint "
          f"({written / 1e9:.2f} GB); fixed cost {base / 1e9:.2f} GB, above it {result['ratio_above_baseline']:.3f} x; "
          f"largest tensor {largest / 1e9:.2f} GB; {r['seconds']:.0f} s")
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
