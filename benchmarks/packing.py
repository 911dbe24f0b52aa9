"""Packing vs pad-to-longest: padding on the realistic length mix, and tiny-model tokens/s.

    python benchmarks/packing.py [--seq-length 4096] [--microbatches 40]
        [--model-seq-length 512] [--model-steps 3] [--model-mbs 4] [--repeats 5] [--modalities image text]

1. Padding: the loader's packed microbatches ([2, seq_length] rows, 256-sample look-ahead) against
   pad-to-longest (8 samples a microbatch, each padded to the longest), per modality of the
   synthetic mix in `megatron_omni.data.synthetic` (M2-omni pre-training lengths); plus the
   Llama-3-8B training FLOPs per real token of both (Megatron-LM accounting, packed rows with
   varlen attention): the speed-up to expect on GPUs at equal MFU (a model, not a timing).
2. Throughput: forward + backward of the tiny Llama (configs/model/tiny_llm.yaml, megatron
   GPTModel, 1-rank world, CUDA emulated on CPU when there is no GPU) on packed vs pad-to-longest
   microbatches of the same micro batch size (rows) over the same number of real tokens; tokens/s
   counts real (non-padding) tokens.  Packed rows use the block-diagonal causal mask built from
   cu_seqlens (local attention takes a dense [B, 1, S, S] mask), so the packed side still pays
   dense S^2 attention over the whole row, where pad-to-longest pays only the longest sample's
   square; flash/TE varlen attention on cu_seqlens pays the sum of the samples' squares.  With
   the tiny model's 64-wide layers the S^2 element-wise work dominates, so short-sample
   modalities (image) can come out slower packed on this path; long ones (text) gain.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import List

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_omni.data.modality_stream import LoaderConfig, ModalitySpec  # noqa: E402
from megatron_omni.data.omni_loader import OmniLoader  # noqa: E402
from megatron_omni.data.packing import packed_attention_mask  # noqa: E402
from megatron_omni.data.synthetic import MODALITIES, SyntheticSource  # noqa: E402
from megatron_omni.models.omni_vocab import OmniVocab  # noqa: E402

PACKED_MBS, PADDED_MBS, LOOKAHEAD = 2, 8, 256


def _loaders(vocab: OmniVocab, modalities, seq_length: int, n_samples: int, packed_mbs: int = PACKED_MBS,
             padded_mbs: int = PADDED_MBS):
    specs = {m: ModalitySpec([SyntheticSource(m, n_samples, vocab=vocab, seq_length=seq_length)]) for m in modalities}
    packed = OmniLoader(specs, LoaderConfig(seq_length=seq_length, micro_batch_size=packed_mbs,
                                            lookahead=LOOKAHEAD, prefetch=0))
    padded = OmniLoader(specs, LoaderConfig(seq_length=seq_length, micro_batch_size=padded_mbs, pack=False,
                                            prefetch=0, max_bad_fraction=1.0))
    return packed, padded


def _segments(mb):
    """(length, is a sample) of every cu_seqlens segment (padding tails carry no loss)."""
    cu, flat_mask = mb.cu_seqlens.tolist(), mb.loss_mask.view(-1)
    return [(b - a, bool(flat_mask[a:b].any())) for a, b in zip(cu[:-1], cu[1:])]


def _real_tokens(mb) -> int:
    return sum(n for n, is_sample in _segments(mb) if is_sample)


def _samples(mb) -> int:
    return sum(1 for _, is_sample in _segments(mb) if is_sample)


def _row_lengths(mb) -> List[List[int]]:
    """Per row, the lengths of its samples (padding excluded)."""
    S, lengths = mb.tokens.shape[1], [[] for _ in range(mb.tokens.shape[0])]
    cu, flat_mask = mb.cu_seqlens.tolist(), mb.loss_mask.view(-1)
    for a, b in zip(cu[:-1], cu[1:]):
        if flat_mask[a:b].any():
            lengths[a // S].append(b - a)
    return lengths


def padding_table(args) -> None:
    from megatron_omni.config.loader import load_section_file
    from megatron_omni.config.schema import ModelConfig
    from megatron_omni.training.flops import llm_flops

    llama8b = load_section_file(ModelConfig, os.path.join(REPO, "configs/model/llama3_8b.yaml"))
    vocab = OmniVocab(text_vocab_size=32000)
    packed, padded = _loaders(vocab, MODALITIES, args.seq_length, 20_000)
    print(f"== padding, seq_length {args.seq_length}: packed [{PACKED_MBS}, {args.seq_length}] rows with a "
          f"{LOOKAHEAD}-sample look-ahead vs pad-to-longest ({PADDED_MBS} samples a microbatch), "
          f"{args.microbatches} microbatches each.\n   Last column: Llama-3-8B training FLOPs per real token "
          f"(Megatron-LM accounting, training/flops.py), pad-to-longest / packed with varlen attention\n"
          f"   (sum of squared sample lengths) -- the expected speed-up at equal MFU; a model, not a measurement")
    print(f"{'modality':12s} {'mean len':>9s} {'samples/row':>12s} {'packed pad':>11s} {'pad-to-longest':>15s} "
          f"{'8B FLOP ratio':>14s}")
    for m in MODALITIES:
        tokens = samples = 0
        flops = {"packed": 0.0, "padded": 0.0}
        real = {"packed": 0, "padded": 0}
        for _ in range(args.microbatches):
            mb = packed.next_microbatch(m)
            tokens, samples = tokens + _real_tokens(mb), samples + _samples(mb)
            for row in _row_lengths(mb):
                flops["packed"] += llm_flops(llama8b, row + [args.seq_length - sum(row)])
                real["packed"] += sum(row)
            pd = padded.next_microbatch(m)
            for row in _row_lengths(pd):
                flops["padded"] += llm_flops(llama8b, [pd.tokens.shape[1]])
                real["padded"] += sum(row)
        ratio = (flops["padded"] / real["padded"]) / (flops["packed"] / real["packed"])
        print(f"{m:12s} {tokens / samples:9.0f} {samples / (args.microbatches * PACKED_MBS):12.1f} "
              f"{100 * packed.padding_fraction(m):10.2f}% {100 * padded.padding_fraction(m):14.1f}% "
              f"{ratio:13.2f}x")
    print(f"{'all':12s} {'':9s} {'':12s} {100 * packed.padding_fraction():10.2f}% "
          f"{100 * padded.padding_fraction():14.1f}%")
    packed.close()
    padded.close()


def _microbatches(loader: OmniLoader, modality: str, n: int) -> List:
    return [loader.next_microbatch(modality) for _ in range(n)]


def throughput(args) -> None:
    from megatron_omni.config.loader import load_section_file
    from megatron_omni.config.schema import ModelConfig, ParallelConfig
    from megatron_omni.convert.mcore_io import megatron_world
    from megatron_omni.models.init import init_weights_layout_invariant
    from megatron_omni.models.llama import build_llama_chunks

    cfg = load_section_file(ModelConfig, os.path.join(REPO, "configs/model/tiny_llm.yaml"))
    cfg.transformer_impl = "local"  # the dense-mask path (TE would need THD packed_seq_params)
    vocab = OmniVocab(text_vocab_size=cfg.vocab_size - 17 - 64, audio_codebook_size=64)
    S = args.model_seq_length
    print(f"\n== tiny Llama ({cfg.num_layers} layers, hidden {cfg.hidden_size}) forward+backward, "
          f"{'GPU' if torch.cuda.is_available() else 'CPU, CUDA emulated'}, torch threads {torch.get_num_threads()}: "
          f"packed [{args.model_mbs}, {S}] vs pad-to-longest [{args.model_mbs}, longest], the same real tokens "
          f"on both sides; real tokens/s")
    with megatron_world():
        (model,) = build_llama_chunks(cfg, ParallelConfig(), seq_length=S, params_dtype=torch.float32)
        init_weights_layout_invariant([model], cfg, seed=0)
        model.train()

        def step(mb) -> None:
            B, L = mb.tokens.shape
            mb = mb.to(torch.cuda.current_device())
            mask = packed_attention_mask(mb.cu_seqlens, B, L)
            losses = model(mb.tokens, mb.position_ids[0], mask, labels=mb.labels)
            loss = (losses * mb.loss_mask).sum() / mb.loss_mask.sum()
            loss.backward()
            model.zero_grad(set_to_none=True)

        def measure(batches):
            """(real tokens, wall seconds, CPU seconds of this process) over `batches`."""
            real = sum(_real_tokens(mb) for mb in batches)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter(), time.process_time()
            for mb in batches:
                step(mb)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return real, time.perf_counter() - wall, time.process_time() - cpu

        ratios = []
        for m in args.modalities:
            packed, padded = _loaders(vocab, [m], S, 5_000, args.model_mbs, args.model_mbs)
            pk = _microbatches(packed, m, args.model_steps)
            target = sum(_real_tokens(mb) for mb in pk)  # the same real tokens on both sides
            pd, have = [], 0
            while have < target:
                pd.append(padded.next_microbatch(m))
                have += _real_tokens(pd[-1])
            measure(pk)  # warm-up pass over every shape: the first iterations are several times slower
            measure(pd)
            # Alternate the two sides and keep each side's best run: on a shared machine the
            # fastest run is the one least disturbed by other processes.
            runs = [(measure(pk), measure(pd)) for _ in range(args.repeats)]
            best = [min((r[i] for r in runs), key=lambda x: x[1]) for i in (0, 1)]
            wall = [real / t for real, t, _ in best]
            cpu = [real / c for real, _, c in best]
            ratios.append(wall[0] / wall[1])
            print(f"{m:12s} packed {wall[0]:9,.0f} tok/s ({cpu[0]:8,.0f} tok/CPU-s; pad "
                  f"{100 * packed.padding_fraction(m):4.1f}%, {statistics.mean(map(_samples, pk)):.1f} samples/mb) | "
                  f"pad-to-longest {wall[1]:9,.0f} tok/s ({cpu[1]:8,.0f} tok/CPU-s; pad "
                  f"{100 * padded.padding_fraction(m):4.1f}%) | speed-up x{wall[0] / wall[1]:.2f} "
                  f"(CPU-time x{cpu[0] / cpu[1]:.2f}); best of {args.repeats}")
            packed.close()
            padded.close()
        print(f"geometric-mean speed-up x{statistics.geometric_mean(ratios):.2f} on the dense-mask path; with varlen "
              f"attention see the FLOP ratios above (paper Sec. 2.2: 1.5x from packing image-text pairs)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--microbatches", type=int, default=40)
    p.add_argument("--model-seq-length", type=int, default=512)
    p.add_argument("--model-steps", type=int, default=3)
    p.add_argument("--model-mbs", type=int, default=4, help="micro batch size of both sides")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--modalities", nargs="+", default=["image", "text"], choices=MODALITIES)
    p.add_argument("--skip-model", action="store_true")
    args = p.parse_args(argv)
    padding_table(args)
    if not args.skip_model:
        throughput(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
