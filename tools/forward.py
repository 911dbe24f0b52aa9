#!/usr/bin/env python
"""Logits of a megatron-omni checkpoint at any TP/PP, for comparison with other implementations.

    torchrun --nproc_per_node 4 tools/forward.py --load ckpt/llama --input-ids ids.npy --output logits.npy \
        parallel.tp=2 parallel.pp=2

--input-ids: int64 [B, S] (.npy).  --output: float32 [B, S, vocab] (.npy, vocabulary padding removed),
an omni checkpoint (model.yaml / run config with an omni: section) runs as OmniModel on text ids (M-RoPE
ids t = h = w = position, causal mask) and gives logits over the whole omni vocabulary (text ids first);
written by rank 0.  The model config is --model, else <load>/model.yaml (converted checkpoints), else
the run config next to a training run's checkpoints/.  Overrides are section.key=value (parallel.*,
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
    p.add_argument("--input-ids", required=True, action="append", help="int64 token ids [B, S] (.npy)")
    p.add_argument("--output", required=True, action="append",
                   help="float32 logits [B, S, vocab] (.npy), written by rank 0")
    p.add_argument("--model", action="append", default=None,
                   help="ModelConfig YAML (default: found next to the checkpoint)")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. parallel.tp=2 parallel.pp=2")
    args = p.parse_args(argv)
    n = len(args.load)
    if len(args.input_ids) != n or len(args.output) != n or (args.model is not None and len(args.model) != n):
        p.error("give --input-ids and --output (and --model, if any) once per --load")
    return args


def run(args: argparse.Namespace) -> int:
    jobs = list(zip(args.load, args.input_ids, args.output, args.model or [None] * len(args.load)))
    for i, (load, ids_path, output, model) in enumerate(jobs):
        run_one(load, ids_path, output, model, args.micro_batch_size, args.overrides, first=i == 0)
    return 0


def run_one(load: str, ids_path: str, output: str, model_yaml, micro_batch_size: int, overrides, first: bool) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_omni.inference.load import inference_config, load_inference_model, real_vocab_size
    from megatron_omni.parallel.initialize import initialize_distributed, set_random_seeds
    from megatron_omni.parallel.layout import unwrap

    ids = np.load(ids_path)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise SystemExit(f"--input-ids: expected integer token ids [B, S], got {ids.dtype} {list(ids.shape)}")
    batch, seq = ids.shape
    cfg = inference_config(load, model_yaml, overrides, default_precision="fp32")
    cfg.data.seq_length = seq
    p = cfg.parallel
    omni_cfg = cfg.omni
    vocab_size = real_vocab_size(cfg)
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise SystemExit(f"--input-ids: token ids must be in [0, {vocab_size}), got [{ids.min()}, {ids.max()}]")
    if batch % micro_batch_size:
        raise SystemExit(f"batch {batch} is not divisible by --micro-batch-size {micro_batch_size}")

    if p.vpp and (batch // micro_batch_size) % p.pp:
        raise SystemExit(f"interleaved pipelining (parallel.vpp) needs the number of micro-batches "
                         f"({batch // micro_batch_size}) to be a multiple of parallel.pp={p.pp}")
    if first:
        initialize_distributed(p)
    world = dist.get_world_size()
    if world != p.tp * p.pp * p.cp:
        raise SystemExit(f"launch exactly tp*pp*cp={p.tp * p.pp * p.cp} processes (got {world}); "
                         "data parallelism is not used here")
    set_random_seeds(cfg.train.seed)
    model = load_inference_model(cfg, load, seq_length=seq)

    mbs = micro_batch_size
    micro = [torch.from_numpy(ids[i:i + mbs].astype(np.int64)) for i in range(0, batch, mbs)]
    positions = torch.arange(seq, dtype=torch.long).unsqueeze(0)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril().logical_not()[None, None]  # True = masked

    def forward_step(data_iterator, chunk):
        tokens = next(data_iterator) if data_iterator is not None else None
        vp = unwrap(chunk).vp_stage
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=vp is None, vp_stage=vp)
        mask = None
        if omni_cfg is not None:  # M-RoPE ids and the (arbitrary-type) mask on every stage
            b = mbs
            pos = positions.expand(3, b, seq).cuda()
            mask = causal.expand(b, 1, seq, seq).cuda()
            tokens = tokens.cuda() if first else None
        elif first:
            tokens = tokens.cuda()
            pos = positions.expand(tokens.shape[0], seq).cuda()
        else:
            tokens = pos = None
        output = chunk(tokens, pos, mask)

        def gather_logits(output_tensor):  # [b, s, V/tp] -> [b, s, V]
            full = gather_from_tensor_model_parallel_region(output_tensor)
            return torch.zeros((), device=full.device), {"logits": full.float().cpu()}
        return output, gather_logits

    iterators = [iter(micro) for _ in model]
    with torch.no_grad():
        results = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(model) > 1 else iterators[0],
            model=model if len(model) > 1 else model[0],
            num_microbatches=len(micro),
            seq_length=seq,
            micro_batch_size=mbs,
            forward_only=True,
        )
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
