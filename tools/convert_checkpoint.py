#!/usr/bin/env python
"""Convert checkpoints between Hugging Face and megatron-omni (thin CLI over megatron_omni.convert).

    # HF LlamaForCausalLM folder -> checkpoint that training resumes from at TP2 x PP2
    python tools/convert_checkpoint.py hf-to-mcore --hf-dir Llama-3.1-8B --out ckpt/llama31_8b --tp 2 --pp 2
    torchrun --nproc_per_node 4 -m megatron_omni.train --config configs/tiny/llm.yaml \\
        model=ckpt/llama31_8b/model.yaml train.load=ckpt/llama31_8b parallel.tp=2 parallel.pp=2

    # any checkpoint (a converted one, or a training run's checkpoints/) -> HF folder
    python tools/convert_checkpoint.py mcore-to-hf --load runs/x/checkpoints --out release/x \\
        --tokenizer-dir Llama-3.1-8B

    # pretrained parts -> omni checkpoint a stage starts from (train.pretrained_checkpoint=ckpt/m2omni_9b)
    python tools/convert_checkpoint.py omni-from-hf --llm Llama-3.1-8B --vision Qwen2-VL-7B-Instruct \
        --audio paraformer-zh --out ckpt/m2omni_9b --tp 2 --pp 2

    # an omni checkpoint -> one folder transformers runs (trust_remote_code=True); or only its LLM
    python tools/convert_checkpoint.py mcore-to-hf --load runs/at/checkpoints --out release/m2omni
    python tools/convert_checkpoint.py mcore-to-hf --load runs/at/checkpoints --out release/m2omni_llm \\
        --language-model-only

    # weights-only copy for another layout
    python tools/convert_checkpoint.py reshard --load ckpt/llama31_8b --out ckpt/llama31_8b_tp1 --tp 1 --pp 1

Conversions stream tensor by tensor (peak memory about one tensor, not the model) in one
process, check coverage and shapes before writing anything, and write into a temporary
folder renamed into place at the end.  Exit status 2 with the list of problems when the
input cannot be converted exactly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Convert checkpoints between Hugging Face and megatron-omni.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def layout(sp):
        sp.add_argument("--tp", type=int, required=True,
                        help="tensor parallel size the checkpoint is for (fixes the vocabulary padding)")
        sp.add_argument("--pp", type=int, required=True, help="pipeline parallel size (checked against the layer count)")
        sp.add_argument("--vpp", type=int, default=None, help="virtual pipeline chunks per stage (checked)")
        sp.add_argument("--ep", type=int, default=1, help="expert parallel size (recorded; dense Llama has no experts)")

    a = sub.add_parser("hf-to-mcore", help="HF LlamaForCausalLM folder -> megatron-omni checkpoint")
    a.add_argument("--hf-dir", required=True)
    a.add_argument("--out", required=True, help="new checkpoints root (train.load=OUT, model=OUT/model.yaml)")
    layout(a)
    a.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default: the HF weights' dtype")
    a.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="megatron pads the vocabulary to a multiple of this x TP (default 128)")

    b = sub.add_parser("mcore-to-hf", help="megatron-omni checkpoint (any layout) -> HF folder")
    b.add_argument("--load", required=True, help="checkpoints root or one iter_XXXXXXX folder")
    b.add_argument("--out", required=True)
    b.add_argument("--model", default=None, help="ModelConfig YAML (default: <load>/model.yaml or the run's config.yaml)")
    b.add_argument("--tokenizer-dir", default=None, help="copy tokenizer files from here")
    b.add_argument("--template-dir", default=None,
                   help="HF folder whose config.json token ids and generation_config.json to keep "
                        "(default: <load>/hf_source of a converted checkpoint)")
    b.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default: the checkpoint's dtype")
    b.add_argument("--max-shard-size", default="5GB")
    b.add_argument("--language-model-only", action="store_true",
                   help="omni checkpoint: write only its LLM, as a plain LlamaForCausalLM folder")

    c = sub.add_parser("reshard", help="megatron-omni checkpoint -> weights-only checkpoint for another layout")
    c.add_argument("--load", required=True)
    c.add_argument("--out", required=True)
    layout(c)
    c.add_argument("--model", default=None)
    c.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None)

    o = sub.add_parser("omni-from-hf", help="HF Llama + Qwen2-VL vision tower + Whisper/FunASR audio -> omni checkpoint")
    o.add_argument("--llm", required=True, help="HF LlamaForCausalLM folder")
    o.add_argument("--vision", default=None,
                   help="Qwen2-VL folder (Qwen2VLForConditionalGeneration: visual.* is taken) or a vision-tower folder")
    o.add_argument("--audio", default=None,
                   help="HF Whisper folder (encoder taken) or FunASR Paraformer folder (model.pt, config.yaml, am.mvn)")
    o.add_argument("--out", required=True, help="new checkpoints root (train.pretrained_checkpoint=OUT, base: OUT/model.yaml)")
    layout(o)
    o.add_argument("--first-stage-num-layers", type=int, default=None, help="decoder layers of pipeline stage 0 (checked)")
    o.add_argument("--audio-codebook-size", type=int, default=4096, help="speech output codes in the omni vocabulary")
    o.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default: the LLM weights' dtype")
    o.add_argument("--seed", type=int, default=1234, help="seed of the new vocabulary rows and the connectors")
    o.add_argument("--make-vocab-size-divisible-by", type=int, default=128)

    for sp in (a, b, c, o):
        sp.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    from megatron_omni.convert import ConversionError, hf_to_mcore, mcore_to_hf, reshard

    try:
        if args.command == "omni-from-hf":
            from megatron_omni.convert.omni_import import omni_from_hf

            report = omni_from_hf(args.llm, args.out, vision_dir=args.vision, audio_dir=args.audio, tp=args.tp,
                                  pp=args.pp, vpp=args.vpp, first_stage_num_layers=args.first_stage_num_layers,
                                  audio_codebook_size=args.audio_codebook_size, dtype=args.dtype, seed=args.seed,
                                  make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                                  overwrite=args.overwrite)
            report = {k: v for k, v in report.items() if k not in ("initialised", "dropped")} | {
                "initialised": len(report["initialised"]), "dropped": len(report["dropped"]),
                "report": os.path.join(report["out"], "conversion_report.json")}
        elif args.command == "hf-to-mcore":
            report = hf_to_mcore(args.hf_dir, args.out, tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep,
                                 dtype=args.dtype, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                                 overwrite=args.overwrite)
        elif args.command == "mcore-to-hf":
            report = mcore_to_hf(args.load, args.out, model_yaml=args.model, dtype=args.dtype,
                                 tokenizer_dir=args.tokenizer_dir, template_dir=args.template_dir,
                                 max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                                 language_model_only=args.language_model_only)
        else:
            report = reshard(args.load, args.out, tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep,
                             model_yaml=args.model, dtype=args.dtype, overwrite=args.overwrite)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


# Guarded: megatron's checkpoint writer may start a spawn multiprocessing manager, which re-imports __main__.
if __name__ == "__main__":
    sys.exit(main())
