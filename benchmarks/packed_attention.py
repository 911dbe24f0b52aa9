"""Packed rows with THD attention vs the dense block-diagonal mask vs pad-to-longest: tokens/s.

    python benchmarks/packed_attention.py [--model-seq-length 512] [--model-steps 3] [--model-mbs 4]
        [--repeats 5] [--modalities image text]

Forward + backward of the tiny Llama (configs/model/tiny_llm.yaml, megatron GPTModel, 1-rank world,
CUDA emulated on CPU when there is no GPU) over the same real tokens of the synthetic M2-omni
length mix (`megatron_omni.data.synthetic`, the loader of benchmarks/packing.py), three ways:

* packed `torch`: [B, S] packed rows run as one THD stream with `PackedCoreAttention`
  (models/packed_attention.py: per-segment SDPA on CPU, varlen_attn on CUDA) -- attention work is
  the sum of the samples' squares and nothing S x S is built;
* packed `dense`: the same rows with the block-diagonal [B, 1, S, S] mask (megatron's local
  DotProductAttention, `model.packed_attention=dense`);
* pad-to-longest: one sample per row, rows padded to the microbatch's longest (as benchmarks/packing.py).

tokens/s counts real (non-padding) tokens; each side keeps its best of `--repeats` alternated runs.
The two packed sides share weights; the THD side restarts the 1D RoPE positions at every sample
(megatron's THD rotary), the dense side rotates by row position -- the same work either way.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.packing import _loaders, _microbatches, _real_tokens, _samples  # noqa: E402
from megatron_omni.data.packing import packed_attention_mask  # noqa: E402
from megatron_omni.data.synthetic import MODALITIES  # noqa: E402
from megatron_omni.models.omni_vocab import OmniVocab  # noqa: E402


def _model(cfg, S: int, backend: str):
    from megatron.core.models.gpt import GPTModel

    from megatron_omni.config.schema import ParallelConfig
    from megatron_omni.models.llama import gpt_model_kwargs
    from megatron_omni.models.packed_attention import packed_attention_spec

    (kwargs,) = gpt_model_kwargs(cfg, ParallelConfig(), seq_length=S, params_dtype=torch.float32)
    return GPTModel(**{**kwargs, "transformer_layer_spec": packed_attention_spec(kwargs["transformer_layer_spec"],
                                                                                 backend)})


def throughput(args) -> None:
    from megatron_omni.config.loader import load_section_file
    from megatron_omni.config.schema import ModelConfig
    from megatron_omni.convert.mcore_io import megatron_world
    from megatron_omni.models.init import init_weights_layout_invariant
    from megatron_omni.models.packed_attention import thd_packed_seq_params

    cfg = load_section_file(ModelConfig, os.path.join(REPO, "configs/model/tiny_llm.yaml"))
    cfg.transformer_impl = "local"
    vocab = OmniVocab(text_vocab_size=cfg.vocab_size - 17 - 64, audio_codebook_size=64)
    S = args.model_seq_length
    print(f"== tiny Llama ({cfg.num_layers} layers, hidden {cfg.hidden_size}) forward+backward, "
          f"{'GPU' if torch.cuda.is_available() else 'CPU, CUDA emulated'}, torch threads {torch.get_num_threads()}: "
          f"packed [{args.model_mbs}, {S}] (THD torch / dense mask) vs pad-to-longest [{args.model_mbs}, longest]; "
          f"real tokens/s, best of {args.repeats}")
    with megatron_world():
        dense, thd = _model(cfg, S, "dense"), _model(cfg, S, "torch")
        init_weights_layout_invariant([dense], cfg, seed=0)
        thd.load_state_dict(dense.state_dict())
        dense.train()
        thd.train()

        def step_dense(mb) -> None:
            B, L = mb.tokens.shape
            mb = mb.to(torch.cuda.current_device())
            losses = dense(mb.tokens, mb.position_ids[0], packed_attention_mask(mb.cu_seqlens, B, L), labels=mb.labels)
            ((losses * mb.loss_mask).sum() / mb.loss_mask.sum()).backward()
            dense.zero_grad(set_to_none=True)

        def step_thd(mb) -> None:
            host_cu = mb.cu_seqlens
            mb = mb.to(torch.cuda.current_device())
            packed = thd_packed_seq_params(host_cu, mb.cu_seqlens, "torch")
            flat = lambda t: t.reshape(1, -1)  # noqa: E731 - the rows back to back, batch 1
            losses = thd(flat(mb.tokens), flat(mb.position_ids[0]), None, labels=flat(mb.labels),
                         packed_seq_params=packed)
            mask = flat(mb.loss_mask)
            ((losses * mask).sum() / mask.sum()).backward()
            thd.zero_grad(set_to_none=True)

        def measure(step, batches):
            real = sum(_real_tokens(mb) for mb in batches)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = time.perf_counter()
            for mb in batches:
                step(mb)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return real / (time.perf_counter() - wall)

        ratios = []
        for m in args.modalities:
            packed, padded = _loaders(vocab, [m], S, 5_000, args.model_mbs, args.model_mbs)
            pk = _microbatches(packed, m, args.model_steps)
            target = sum(_real_tokens(mb) for mb in pk)  # the same real tokens on every side
            pd, have = [], 0
            while have < target:
                pd.append(padded.next_microbatch(m))
                have += _real_tokens(pd[-1])
            sides = {"packed torch": (step_thd, pk), "packed dense": (step_dense, pk),
                     "pad-to-longest": (step_dense, pd)}
            for step, batches in sides.values():  # warm-up over every shape
                measure(step, batches)
            runs = [{name: measure(step, batches) for name, (step, batches) in sides.items()}
                    for _ in range(args.repeats)]
            best = {name: max(r[name] for r in runs) for name in sides}
            ratios.append(best["packed torch"] / best["pad-to-longest"])
            print(f"{m:8s} " + " | ".join(f"{name} {best[name]:9,.0f} tok/s" for name in sides)
                  + f" | torch / pad-to-longest x{ratios[-1]:.2f}, torch / dense x"
                  f"{best['packed torch'] / best['packed dense']:.2f} "
                  f"({statistics.mean(map(_samples, pk)):.1f} samples per packed microbatch)")
            packed.close()
            padded.close()
        print("geometric-mean speed-up of packed THD (torch) over pad-to-longest "
              f"x{statistics.geometric_mean(ratios):.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-seq-length", type=int, default=512)
    p.add_argument("--model-steps", type=int, default=3)
    p.add_argument("--model-mbs", type=int, default=4, help="micro batch size (rows) of every side")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--modalities", nargs="+", default=["image", "text"], choices=MODALITIES)
    throughput(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
