"""Cost of the omni wrapper on the backbone: OmniModel vs the bare megatron-core GPTModel.

    python benchmarks/omni_overhead.py [--steps 10] [--seq 512] [--mbs 2] [--layers 4] [--hidden 256]
    python benchmarks/omni_overhead.py --parallel [--steps 12] [--rounds 2]

--parallel: whole training steps through the loop at emulated TP2 x PP2 (4 ranks,
tools/profile_throughput.py): the tiny omni model with its encoders off on text-only packed
rows (mock data) vs the tiny Llama text run, same backbone, sequence and global batch; the
runs alternate so machine-load drift hits both; prints mean step times and their ratio.

Same backbone weights, same text-only microbatch, forward + backward, one rank:
  * bare:  GPTModel, 1D RoPE, megatron's implicit causal mask (what a text-only Llama run does);
  * omni:  OmniModel, M-RoPE position ids [3, B, S], packed block-diagonal causal mask,
           embedding with placeholder replacement (no media in the batch);
and, for reference, the omni model on an image microbatch of the same shape (encoder included).
Prints ms/step and the ratios; the omni text step should stay within 5% of the bare one (the
wrapper adds the mask build, the M-RoPE frequencies and the scatter check, no extra matmuls).
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
os.chdir(REPO)


def timed(fn, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def parallel_steps(args) -> None:
    """The --parallel comparison (module docstring)."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from tiny_throughput import run_layout

    h = args.hidden  # the single-rank comparison's backbone (head_dim 32)
    same = [f"data.seq_length={args.seq}", f"train.micro_batch_size={args.mbs}", "train.global_batch_size=16",
            "parallel.tp=2", "parallel.pp=2", f"model.num_layers={args.layers}", f"model.hidden_size={h}",
            f"model.ffn_hidden_size={4 * h}", f"model.num_attention_heads={h // 32}",
            f"model.num_query_groups={h // 64}"]
    runs = {
        "bare": ("configs/tiny/llm.yaml", []),
        "omni": ("configs/tiny/omni_mock.yaml", ["omni.vision=null", "omni.audio=null", "omni.audio_codebook_size=0",
                                                 "omni.mrope_section=[4,6,6]"]),
    }
    means = {name: [] for name in runs}
    for r in range(args.rounds):
        for name, (config, extra) in runs.items():
            run_args = argparse.Namespace(config=config, steps=args.steps, warmup=3,
                                          out=os.path.join("runs", "bench_omni_overhead", f"{name}_{r}"))
            summary = run_layout(name, 4, same, run_args, extra)
            means[name].append(summary["step_time_ms"]["mean"])
    b, o = min(means["bare"]), min(means["omni"])
    print(f"\nTP2 x PP2 (4 emulated ranks), {args.layers} layers x {h}, seq {args.seq}, micro batch {args.mbs}, GBS 16; "
          f"mean step ms over "
          f"{args.rounds} alternating rounds (best round): bare {b:.1f} {means['bare']}, omni {o:.1f} {means['omni']}")
    print(f"omni (encoders off, text-only packed rows) / bare GPTModel step time: {o / b:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--mbs", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--parallel", action="store_true", help="whole steps at emulated TP2 x PP2 (see above)")
    p.add_argument("--rounds", type=int, default=2, help="--parallel: alternating rounds")
    args = p.parse_args()
    if args.parallel:
        return parallel_steps(args)

    from megatron.core.models.gpt import GPTModel

    from megatron_omni.config import ParallelConfig
    from megatron_omni.config.loader import load_section_file
    from megatron_omni.config.schema import ModelConfig, OmniConfig
    from megatron_omni.convert.mcore_io import megatron_world
    from megatron_omni.data.mock_omni import MockOmniData
    from megatron_omni.models.llama import gpt_model_kwargs
    from megatron_omni.models.omni import build_omni_chunks, init_omni_weights_layout_invariant

    torch.manual_seed(0)
    h = args.hidden
    llm = load_section_file(ModelConfig, "configs/model/tiny_llm.yaml")
    llm = ModelConfig(**{**llm.__dict__, "num_layers": args.layers, "hidden_size": h, "ffn_hidden_size": 4 * h,
                         "num_attention_heads": h // 32, "num_query_groups": h // 64, "rope_scaling": False})
    omni = load_section_file(OmniConfig, "configs/model/omni_tiny.yaml")
    omni.vision.out_hidden_size = omni.audio.out_hidden_size = h
    omni.mrope_section = [4, 6, 6]  # head_dim 32
    with megatron_world():
        (model,) = build_omni_chunks(llm, ParallelConfig(), omni, seq_length=args.seq, params_dtype=torch.float32)
        init_omni_weights_layout_invariant([model], llm, omni, seed=1)
        (kw,) = gpt_model_kwargs(llm, ParallelConfig(), seq_length=args.seq, params_dtype=torch.float32,
                                 vocab_size=model.vocab.size)
        bare = GPTModel(**kw)
        bare.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(("vision.", "audio."))},
                             strict=False)
        B, S = args.mbs, args.seq
        tokens = torch.randint(0, llm.vocab_size, (B, S))
        labels = torch.randint(0, llm.vocab_size, (B, S))
        pos = torch.arange(S).expand(B, S)
        cu = torch.arange(B + 1, dtype=torch.int32) * S

        def step_bare():
            bare.zero_grad(set_to_none=True)
            bare(tokens, pos, None, labels=labels).mean().backward()

        def step_omni():
            model.zero_grad(set_to_none=True)
            mask, packed = model.packed_row_attention(cu, B, S)
            model(tokens, pos.expand(3, B, S), mask, packed_seq_params=packed, labels=labels).mean().backward()

        data = MockOmniData(omni, model.vocab, seq_length=S, micro_batch_size=B, seed=0)
        image = data.next_microbatch("image")

        def step_image():
            model.zero_grad(set_to_none=True)
            mask, packed = model.packed_row_attention(image.cu_seqlens, B, S)
            model(image.tokens, image.position_ids, mask, packed_seq_params=packed, labels=image.labels,
                  pixel_values=image.pixel_values, image_grid_thw=image.image_grid_thw).mean().backward()

        # interleave the measurements so machine load drifts hit both alike
        bare_ms, omni_ms = [], []
        for _ in range(3):
            bare_ms.append(timed(step_bare, args.steps))
            omni_ms.append(timed(step_omni, args.steps))
        image_ms = timed(step_image, args.steps)
    b, o = min(bare_ms), min(omni_ms)
    print(f"backbone: {args.layers} layers, hidden {h}, seq {S}, micro batch {B}; fp32, 1 rank, CPU threads "
          f"{torch.get_num_threads()}")
    print(f"bare GPTModel (text, RoPE, causal)          {b:9.1f} ms/step")
    print(f"OmniModel (text, M-RoPE, packed mask)       {o:9.1f} ms/step   ratio {o / b:.3f}")
    print(f"OmniModel (image microbatch, with NaViT)    {image_ms:9.1f} ms/step   ratio {image_ms / b:.3f} "
          f"({int(image.image_grid_thw.prod(-1).sum())} patches)")


if __name__ == "__main__":
    main()
