#!/usr/bin/env python
"""Logits of a megatron-omni checkpoint at any TP/PP, for comparison with other implementations.

    torchrun --nproc_per_node 4 tools/forward.py --load ckpt/llama --input-ids ids.npy --output logits.npy \
        parallel.tp=2 parallel.pp=2

--input-ids: int64 [B, S] (.npy).  --output: float32 [B, S, vocab] (.npy, vocabulary padding removed),
written by rank 0.  An omni checkpoint (model.yaml / run config with an omni: section) runs as OmniModel
and gives logits over the whole omni vocabulary (text ids first), on text ids (M-RoPE ids t = h = w =
position, causal mask) or, instead of --input-ids, on one manifest row with its media built by the
training sample builder (data/sample_builder.py; output [1, S, vocab]):

    torchrun --nproc_per_node 2 tools/forward.py --load runs/pt1/checkpoints --manifest demo/manifests/caption.jsonl \
        --line 3 --data-root demo --output logits.npy parallel.tp=2

A training run's LoRA adapters (its config's lora: section, alignment tuning) are applied.  The
tokenizer is the run config's data.tokenizer_* (a training run), else the converted checkpoint's
hf_source/ Llama-3 tokenizer (omni-from-hf), else data.tokenizer_type=.. data.tokenizer_model=...
The model config is --model, else <load>/model.yaml (converted checkpoints), else the run config
next to a training run's checkpoints/.  Overrides are section.key=value (parallel.*,
model.*, train.precision; default fp32).  Runs megatron's forward-only pipeline schedule on the
real GPTModel chunks; the vocab-parallel logits are gathered over TP on the last pipeline stage.

Several checkpoints can be run in one launch (one world, one model after the other): repeat
--load/--input-ids/--output (and --model, once per --load if given) in the same order.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, action="append", help="checkpoints root (or one iter_XXXXXXX folder)")
    p.add_argument("--input-ids", action="append", default=[], help="int64 token ids [B, S] (.npy)")
    p.add_argument("--manifest", help="instead of --input-ids (omni checkpoints): a JSONL manifest ...")
    p.add_argument("--line", type=int, help="... the 1-based line of its sample ...")
    p.add_argument("--data-root", help="... and the folder its media paths are relative to")
    p.add_argument("--max-image-tokens", type=int, default=320, help="manifest mode: LLM tokens per image "
                   "(Table 2: 320 PT, 1280 IT-1, 2560 IT-2/3)")
    p.add_argument("--max-video-frames", type=int, default=16, help="manifest mode: frames per video")
    p.add_argument("--output", required=True, action="append",
                   help="float32 logits [B, S, vocab] (.npy), written by rank 0")
    p.add_argument("--model", action="append", default=None,
                   help="ModelConfig YAML (default: found next to the checkpoint)")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. parallel.tp=2 parallel.pp=2")
    args = p.parse_args(argv)
    n = len(args.load)
    if args.manifest is not None:
        if args.input_ids or n != 1 or args.line is None or args.data_root is None:
            p.error("--manifest takes one --load, --line N and --data-root DIR, and no --input-ids")
        args.input_ids = [None]
    if len(args.input_ids) != n or len(args.output) != n or (args.model is not None and len(args.model) != n):
        p.error("give --input-ids and --output (and --model, if any) once per --load")
    return args


def run(args: argparse.Namespace) -> int:
    jobs = list(zip(args.load, args.input_ids, args.output, args.model or [None] * len(args.load)))
    for i, (load, ids_path, output, model) in enumerate(jobs):
        run_one(load, ids_path, output, model, args, first=i == 0)
    return 0


def run_one(load: str, ids_path: Optional[str], output: str, model_yaml, args: argparse.Namespace,
            first: bool) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_omni.inference.load import inference_config, load_inference_model, real_vocab_size
    from megatron_omni.parallel.initialize import initialize_distributed, set_random_seeds
    from megatron_omni.parallel.layout import unwrap
    from megatron_omni.training.step import run_schedule

    mbs = args.micro_batch_size
    cfg = inference_config(load, model_yaml, args.overrides, default_precision="fp32")
    p, m, omni_cfg = cfg.parallel, cfg.model, cfg.omni
    vocab_size = real_vocab_size(cfg)
    if omni_cfg is not None:
        from megatron_omni.data.forward_batches import manifest_microbatch, text_microbatches
        from megatron_omni.models.omni import omni_vocab

        vocab = omni_vocab(m, omni_cfg)
    if args.manifest is not None:
        if omni_cfg is None:
            raise SystemExit(f"--manifest: {load} is a language-model checkpoint (no omni: section in its "
                             "config); give it --input-ids")
        from megatron_omni.data.media.errors import MediaError
        from megatron_omni.data.tokenizer import build_tokenizer

        try:  # a bad row, a missing or undecodable medium: one line naming it (path:line)
            micro = [manifest_microbatch(args.manifest, args.line, root=args.data_root,
                                         tokenizer=build_tokenizer(cfg.data, vocab_size=m.vocab_size), vocab=vocab,
                                         vision=omni_cfg.vision, audio=omni_cfg.audio,
                                         max_image_tokens=args.max_image_tokens,
                                         max_video_frames=args.max_video_frames)]
        except (ValueError, OSError, MediaError) as err:  # ManifestError / TemplateError are ValueErrors
            raise SystemExit(f"--manifest {args.manifest} --line {args.line}: {err}") from None
        batch, seq = micro[0].tokens.shape
        mbs = 1
    else:
        ids = np.load(ids_path)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise SystemExit(f"--input-ids: expected integer token ids [B, S], got {ids.dtype} {list(ids.shape)}")
        batch, seq = ids.shape
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise SystemExit(f"--input-ids: token ids must be in [0, {vocab_size}), got [{ids.min()}, {ids.max()}]")
        if batch % mbs:
            raise SystemExit(f"batch {batch} is not divisible by --micro-batch-size {mbs}")
        if omni_cfg is not None:
            micro = text_microbatches(ids, mbs)
        else:
            micro = [torch.from_numpy(ids[i:i + mbs].astype(np.int64)) for i in range(0, batch, mbs)]
    cfg.data.seq_length = seq

    if p.vpp and len(micro) % p.pp:
        raise SystemExit(f"interleaved pipelining (parallel.vpp) needs the number of micro-batches "
                         f"({len(micro)}) to be a multiple of parallel.pp={p.pp}")
    if first:
        initialize_distributed(p)
    world = dist.get_world_size()
    if world != p.tp * p.pp * p.cp:
        raise SystemExit(f"launch exactly tp*pp*cp={p.tp * p.pp * p.cp} processes (got {world}); "
                         "data parallelism is not used here")
    set_random_seeds(cfg.train.seed)
    model = load_inference_model(cfg, load, seq_length=seq)

    positions = torch.arange(seq, dtype=torch.long).unsqueeze(0)

    def forward_step(data_iterator, chunk):
        item = next(data_iterator) if data_iterator is not None else None
        inner = unwrap(chunk)
        vp = inner.vp_stage
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=vp is None, vp_stage=vp)
        if omni_cfg is not None:  # as the training step: M-RoPE ids and the mask on every stage, media on the first
            from megatron_omni.training.stage_inputs import stage_inputs

            if inner.pre_process:
                item.count_placeholders(inner.vocab.placeholder_ids)
            mb, mask, packed = stage_inputs(item, {}, inner)
            media = mb.media_inputs() if inner.pre_process else {}
            output = chunk(mb.tokens if inner.pre_process else None, mb.position_ids, mask,
                           packed_seq_params=packed, **media)
        else:
            tokens = pos = None
            if first:
                tokens = item.cuda()
                pos = positions.expand(tokens.shape[0], seq).cuda()
            output = chunk(tokens, pos, None)

        def gather_logits(output_tensor):  # [b, s, V/tp] -> [b, s, V]
            full = gather_from_tensor_model_parallel_region(output_tensor)
            return torch.zeros((), device=full.device), {"logits": full.float().cpu()}
        return output, gather_logits

    with torch.no_grad():  # the training's schedule call: it sizes the p2p buffers by the model's layout
        results = run_schedule(model, [iter(micro) for _ in model], forward_only=True, forward_step_func=forward_step,
                               num_microbatches=len(micro), seq_length=seq, micro_batch_size=mbs)
    holder = parallel_state.get_pipeline_model_parallel_last_rank()  # on rank 0: its pipeline's last stage
    logits = None
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and parallel_state.get_tensor_model_parallel_rank() == 0:
        logits = torch.cat([r["logits"] for r in results], dim=0)[..., :vocab_size].contiguous()
        if dist.get_rank() != 0:
            dist.send(logits, dst=0)
    if dist.get_rank() == 0:
        if logits is None:
            logits = torch.empty((batch, seq, vocab_size), dtype=torch.float32)
            dist.recv(logits, src=holder)
        out_dir = os.path.dirname(os.path.abspath(output))
        os.makedirs(out_dir, exist_ok=True)
        np.save(output, logits.numpy())
        logging.getLogger("forward").info("wrote %s logits %s", output, list(logits.shape))
    dist.barrier()


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
