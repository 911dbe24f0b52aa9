#!/usr/bin/env python
"""What null experts save: one MoE layer's forward + backward time and dispatched tokens.

    python benchmarks/moe_null_experts.py [--tokens 4096 --hidden 512 --ffn 1024 --experts 8 --iters 10]

Builds megatron MoE layers (this repo's NullExpertRouter; SequentialMLP experts on CPU with CUDA
emulated, TE grouped GEMM on a GPU with Transformer Engine) that differ only in the number of null
experts N (E routed experts, top-2, shared expert on), and times forward + backward on the same
input.  A constant offset on the null experts' logits sets the null rate (0: about N / (E + N)).  Prints
one line per configuration with the measured null rate, tokens the dispatcher moved, time and the
ratio to N = 0 (the baseline, measured in the same run).  Expected: routed-expert time scales with
(1 - null rate); the shared expert and attention-free overheads do not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()

    import torch

    from megatron_omni.config.schema import ModelConfig, ParallelConfig
    from megatron_omni.convert.mcore_io import megatron_world
    from megatron_omni.models.init import init_weights_layout_invariant
    from megatron_omni.models.llama import build_llama_chunks
    from megatron_omni.config.moe import MoEConfig

    E = args.experts
    rows = []
    with megatron_world():
        for null_bias, N in ((0.0, 0), (0.0, E), (8.0, E)):
            model = ModelConfig(num_layers=1, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                                num_attention_heads=8, num_query_groups=8, vocab_size=256,
                                moe=MoEConfig(num_experts=E, num_null_experts=N, router_topk=2, ffn_hidden_size=args.ffn,
                                              shared_expert_ffn_hidden_size=args.ffn, aux_loss_coeff=0.0))
            layer = build_llama_chunks(model, ParallelConfig(), seq_length=64, params_dtype=torch.float32)[0]
            init_weights_layout_invariant([layer], model, seed=0)
            moe = layer.decoder.layers[0].mlp
            if N:  # a constant offset on the null experts' logits sets how often they win
                offset = torch.cat([torch.zeros(E), torch.full((N,), null_bias)])
                gating = moe.router.gating
                moe.router.gating = lambda x, g=gating, o=offset: g(x) + o
            moved = []
            dispatch = moe.token_dispatcher.token_dispatch
            moe.token_dispatcher.token_dispatch = lambda h, pr, d=dispatch: (moved.append(h.shape[0]), d(h, pr))[1]
            x = torch.randn(args.tokens, 1, args.hidden, generator=torch.Generator().manual_seed(1), requires_grad=True)
            moe.router.counter.reset()
            times = []
            for i in range(args.iters + 2):
                start = time.perf_counter()
                out, _ = moe(x)
                out.sum().backward()
                times.append(time.perf_counter() - start)
            seconds = sorted(times[2:])[len(times[2:]) // 2]  # median: the machine may be shared
            counts = moe.router.counter.counts["all"]
            null_rate = float(counts[E:E + N].sum() / counts[:E + N].sum()) if N else 0.0
            rows.append({"null_experts": N, "null_rate": round(null_rate, 3), "dispatched_tokens": moved[-1],
                         "ms_median": round(seconds * 1e3, 2)})
    base = rows[0]["ms_median"]
    for r in rows:
        r["time_vs_no_null"] = round(r["ms_median"] / base, 3)
        print(f"N={r['null_experts']:2d}  null rate {r['null_rate']:.3f}  dispatched {r['dispatched_tokens']:6d}  "
              f"fwd+bwd {r['ms_median']:8.2f} ms  x{r['time_vs_no_null']:.3f} of N=0")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
