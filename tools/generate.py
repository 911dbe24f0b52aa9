#!/usr/bin/env python
"""Generate with a megatron-omni checkpoint at any TP/PP (KV cache, batched, sampled or greedy).

    torchrun --nproc_per_node 4 tools/generate.py --load runs/tiny_stages/it3/checkpoints \
        --prompt "What is in the picture?" --image cat.jpg --max-new-tokens 32 --greedy parallel.tp=2 parallel.pp=2
    torchrun --nproc_per_node 2 tools/generate.py --load ckpt/llama --prompt-ids ids.npy --output out.npy \
        --max-new-tokens 16 --greedy --stop-ids 2 parallel.pp=2
    torchrun --nproc_per_node 4 tools/generate.py --load CKPT --manifest qa.jsonl --data-root R --out preds.jsonl

--prompt: one question (omni checkpoints: chat template, media from --image/--video/--audio; Llama:
``<bos> + text``), the answer is printed.  --prompt-ids: int64 [B, S] token ids (.npy, every row a
whole prompt, no padding), --output gets int64 [B, K] new tokens (K = --max-new-tokens, rows padded
with the first stop id after they stop); works without a tokenizer (converted Llama checkpoints).
--manifest: answers every row of a JSONL manifest (its turns before the final assistant answer) in
batches of --batch-size, writing {"id", "prediction", "reference"} lines.  Overrides are
section.key=value (parallel.*, train.precision, data.tokenizer_*).  Prints tokens/s.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

log = logging.getLogger("generate")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="checkpoints root (or one iter_XXXXXXX folder)")
    p.add_argument("--model", default=None,
                   help="ModelConfig / omni bundle YAML (default: found next to the checkpoint)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="a question (text)")
    src.add_argument("--prompt-ids", help="int64 token ids [B, S] (.npy)")
    src.add_argument("--manifest", help="JSONL manifest whose rows are answered")
    p.add_argument("--image", action="append", default=[], help="image file for --prompt (repeatable)")
    p.add_argument("--video", action="append", default=[], help="video file for --prompt (repeatable)")
    p.add_argument("--audio", action="append", default=[], help="audio file for --prompt (repeatable)")
    p.add_argument("--output", help="with --prompt-ids: int64 [B, K] new tokens (.npy), written by rank 0")
    p.add_argument("--data-root", default=".", help="with --manifest: folder its media paths are relative to")
    p.add_argument("--out", help="with --manifest: predictions JSONL, written by rank 0")
    p.add_argument("--batch-size", type=int, default=8, help="with --manifest: prompts per generate call")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (default: sampling)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-ids", default=None,
                   help="comma-separated stop token ids (default: the tokenizer's EOS, plus <|eot_id|> for omni)")
    p.add_argument("--max-image-tokens", type=int, default=320)
    p.add_argument("--max-video-frames", type=int, default=16)
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. parallel.tp=2 parallel.pp=2")
    args = p.parse_args(argv)
    if args.prompt_ids and not args.output:
        p.error("--prompt-ids needs --output OUT.npy")
    if args.manifest and not args.out:
        p.error("--manifest needs --out PREDS.jsonl")
    if (args.image or args.video or args.audio) and not args.prompt:
        p.error("--image/--video/--audio go with --prompt (manifest rows name their own media)")
    return args


def _read_prompt_ids(path: str) -> List[List[int]]:
    import numpy as np

    ids = np.load(path)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise SystemExit(f"--prompt-ids {path}: expected integer token ids [B, S], got {ids.dtype} {list(ids.shape)}")
    return [row.tolist() for row in ids.astype(np.int64)]


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch.distributed as dist

    from megatron_omni.inference.chat import ChatPrompts, MediaLimits
    from megatron_omni.inference.generate import SamplingParams, generate
    from megatron_omni.inference.load import inference_config, load_inference_model, real_vocab_size
    from megatron_omni.parallel.initialize import initialize_distributed, set_random_seeds

    cfg = inference_config(args.load, args.model, args.overrides)
    p = cfg.parallel
    initialize_distributed(p)
    if dist.get_world_size() != p.tp * p.pp:
        raise SystemExit(f"launch exactly tp*pp={p.tp * p.pp} processes (got {dist.get_world_size()}); "
                         "generation uses no data parallelism (parallel.cp must be 1)")
    set_random_seeds(cfg.train.seed)
    vocab = real_vocab_size(cfg)

    chat = None
    if not args.prompt_ids or args.stop_ids is None:
        try:
            chat = ChatPrompts(cfg, MediaLimits(args.max_image_tokens, args.max_video_frames))
        except ValueError as err:
            if not args.prompt_ids:
                raise SystemExit(f"tools/generate.py: {err}") from None
    stop = [int(s) for s in args.stop_ids.split(",") if s.strip()] if args.stop_ids else (chat.stop_ids if chat else [])
    params = SamplingParams(max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_ids=stop)

    rows, batches = [], []
    if args.prompt_ids:
        batches = [(_read_prompt_ids(args.prompt_ids), None)]
    elif args.prompt is not None:
        ids, media = chat.from_text(args.prompt, images=args.image, videos=args.video, audios=args.audio)
        batches = [([ids], [media])]
    else:
        from megatron_omni.data.manifest import read_manifest

        rows = read_manifest(args.manifest)
        built = [chat.from_row(r, args.data_root) for r in rows]
        n = max(1, args.batch_size)
        batches = [([b[0] for b in built[i:i + n]], [b[1] for b in built[i:i + n]]) for i in range(0, len(built), n)]
    longest = max(len(ids) for prompts, _ in batches for ids in prompts)
    model = load_inference_model(cfg, args.load, seq_length=longest + args.max_new_tokens)

    outputs, tokens, seconds = [], 0, 0.0
    for prompts, media in batches:
        out = generate(model, prompts, params, media=media if media and any(m is not None for m in media) else None,
                       vocab_size=vocab)
        outputs.append(out)
        tokens += out.num_tokens
        seconds += out.elapsed_s
    rank0 = dist.get_rank() == 0
    if rank0:
        if args.prompt_ids:
            result = np.concatenate([o.tokens.numpy() for o in outputs]).astype(np.int64)
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            np.save(args.output, result)
            log.info("wrote %s new tokens %s", args.output, list(result.shape))
        elif args.prompt is not None:
            out = outputs[0]
            print(chat.decode(out.tokens[0, :int(out.lengths[0])].tolist()), flush=True)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                i = 0
                for out in outputs:
                    for b in range(out.tokens.shape[0]):
                        row = rows[i]
                        ref = row.conversations[-1].content if row.conversations and \
                            row.conversations[-1].role == "assistant" else None
                        f.write(json.dumps({"id": row.id, "prediction": chat.decode(out.tokens[b].tolist()),
                                            "reference": ref}) + "\n")
                        i += 1
            log.info("wrote %d predictions to %s", len(rows), args.out)
        print(f"generated {tokens} tokens in {seconds:.2f}s: {tokens / max(seconds, 1e-9):.1f} tokens/s "
              f"(tp={p.tp} pp={p.pp} vpp={p.vpp or 1}, {len(batches)} batch(es))", flush=True)
    dist.barrier()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    try:
        return run(args)
    finally:
        from megatron_omni.parallel.initialize import destroy_distributed

        destroy_distributed()


# Guarded: megatron's checkpoint code may start a spawn multiprocessing manager, which re-imports __main__.
if __name__ == "__main__":
    sys.exit(main())
