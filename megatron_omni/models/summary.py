"""Per-module parameter table of a model config, built on the meta device (no memory, no GPU).

    python -m megatron_omni.models.summary --config configs/model/m2omni_72b.yaml

Accepts a run config or a model bundle (`model:` + optional `omni:` sections).  The model is
built exactly as training builds it (megatron-core modules, one rank, TP = PP = 1), so the
counts are those of the real model, including the vocabulary padding rows; the last line is
`total_params: N`.
"""

from __future__ import annotations

import argparse
import sys
from collections import OrderedDict
from typing import Dict, List, Optional

import torch

from megatron_omni.config import ConfigError, ParallelConfig, RunConfig, load_config


def _group(name: str) -> str:
    from megatron_omni.models.omni import module_of

    module = module_of(name)
    if module != "llm":
        return module
    for part in ("embedding", "output_layer", "decoder.final_layernorm"):
        if name.startswith(part):
            return "llm." + part.split(".")[-1]
    return "llm.decoder_layers"


def parameter_counts(cfg: RunConfig) -> Dict[str, int]:
    """{module: parameters} of the full model (single rank)."""
    from megatron_omni.convert.mcore_io import MetaDevice, megatron_world

    single = ParallelConfig()
    with megatron_world(), MetaDevice():
        if cfg.omni is not None:
            from megatron_omni.models.omni import build_omni_chunks

            chunks = build_omni_chunks(cfg.model, single, cfg.omni, seq_length=128, params_dtype=torch.bfloat16)
        else:
            from megatron_omni.models.llama import build_llama_chunks

            chunks = build_llama_chunks(cfg.model, single, seq_length=128, params_dtype=torch.bfloat16)
    counts: Dict[str, int] = OrderedDict()
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            key = _group(name)
            counts[key] = counts.get(key, 0) + p.numel()
    return counts


def format_table(counts: Dict[str, int]) -> List[str]:
    total = sum(counts.values())
    width = max(len(k) for k in counts) + 2
    lines = [f"{'module':<{width}}{'parameters':>16}{'share':>9}"]
    for key, n in counts.items():
        lines.append(f"{key:<{width}}{n:>16,}{100 * n / total:>8.2f}%")
    lines.append(f"{'total':<{width}}{total:>16,}  ({total / 1e9:.3f}B)")
    lines.append(f"total_params: {total}")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_omni.models.summary", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="run config or model bundle YAML")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print("\n".join(format_table(parameter_counts(cfg))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
