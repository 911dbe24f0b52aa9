"""torchrun worker (4 ranks) of test_generate.py: the same prompts generated at TP2xPP2, TP2xPP2xVPP2
and on one rank, plus the no-cache full-recompute greedy reference on one rank; results -> JSON.

Weights are the layout-invariant init (models/init.py), so every layout holds bit-identical weights
without a checkpoint.  Init std 0.3 (not 0.02) gives peaked logits: greedy choices are not near-ties
that float summation order could flip.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from megatron_omni.config import ParallelConfig  # noqa: E402
from megatron_omni.config.loader import load_section_file  # noqa: E402
from megatron_omni.config.schema import ModelConfig, OmniConfig  # noqa: E402
from megatron_omni.inference.generate import PromptMedia, SamplingParams, generate  # noqa: E402
from megatron_omni.models.audio.config import audio_token_count  # noqa: E402
from megatron_omni.models.init import init_weights_layout_invariant  # noqa: E402
from megatron_omni.models.llama import build_llama_chunks  # noqa: E402
from megatron_omni.models.omni import build_omni_chunks, init_omni_weights_layout_invariant, omni_vocab  # noqa: E402
from megatron_omni.models.rope import mrope_position_ids  # noqa: E402
from megatron_omni.parallel.initialize import initialize_distributed, set_random_seeds  # noqa: E402

K = 8
SEED = 11
GREEDY = SamplingParams(max_new_tokens=K, greedy=True)
SAMPLED = SamplingParams(max_new_tokens=K, temperature=0.9, top_k=40, top_p=0.9, seed=5)


def configs():
    llm = load_section_file(ModelConfig, str(REPO / "configs/model/tiny_llm.yaml"))
    llm = dataclasses.replace(llm, init_method_std=0.3)
    omni = load_section_file(OmniConfig, str(REPO / "configs/model/omni_tiny.yaml"))
    return llm, omni


def llama_prompts(vocab: int):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 9, 3)]


def omni_prompts(llm, omni):
    """image / audio / text-only / image+audio prompts, media as the data path lays them out."""
    v = omni_vocab(llm, omni)
    g = torch.Generator().manual_seed(1)
    vis = omni.vision
    row = vis.in_channels * vis.temporal_patch_size * vis.patch_size ** 2

    def text(n):
        return torch.randint(0, v.text_vocab_size, (n,), generator=g).tolist()

    def image():
        grid = torch.tensor([[1, 4, 4]])
        n = int(grid.prod()) // vis.spatial_merge_size ** 2
        return ([v.id("<image>")] + [v.image_pad_id] * n + [v.id("</image>")],
                dict(pixel_values=torch.randn(int(grid.prod()), row, generator=g), image_grid_thw=grid))

    def audio(frames=24):
        n = int(audio_token_count(frames, omni.audio))
        return ([v.id("<audio>")] + [v.audio_pad_id] * n + [v.id("</audio>")],
                dict(audio_features=torch.randn(1, frames, omni.audio.num_mel_bins, generator=g),
                     audio_lengths=torch.tensor([frames])))

    head, tail = [v.id("<|start_header_id|>")], [v.id("<|eot_id|>"), v.id("<|start_header_id|>")]
    (img_ids, img), (aud_ids, aud) = image(), audio()
    (img2_ids, img2), (aud2_ids, aud2) = image(), audio(40)
    prompts = [head + img_ids + text(4) + tail, head + aud_ids + text(7) + tail, head + text(3) + tail,
               head + img2_ids + text(2) + aud2_ids + tail]
    media = [PromptMedia(**img), PromptMedia(**aud), None, PromptMedia(**img2, **aud2)]
    return prompts, media


def build(kind: str, llm, omni, dtype=torch.float32):
    if kind == "llama":
        chunks = build_llama_chunks(llm, PARALLEL, seq_length=64, params_dtype=dtype)
        init_weights_layout_invariant(chunks, llm, SEED)
    else:
        chunks = build_omni_chunks(llm, PARALLEL, omni, seq_length=64, params_dtype=dtype)
        init_omni_weights_layout_invariant(chunks, llm, omni, SEED)
    if dtype != torch.float32:
        from megatron.core.transformer.module import Float16Module

        chunks = [Float16Module(c.config, c) for c in chunks]
    return chunks


def as_lists(out):
    return {"tokens": out.tokens.tolist(), "logprobs": out.logprobs.tolist(), "lengths": out.lengths.tolist()}


@torch.no_grad()
def recompute_greedy(model, prompt, media, vocab_size, banned=(), omni=None):
    """No cache, no padding, no pipeline: the whole sequence through the model each step, argmax
    of the last position (positions recomputed from scratch on the grown sequence)."""
    seq = list(prompt)
    logprobs = []
    m = dataclasses.asdict(media) if media is not None else {}
    m = {k: x for k, x in m.items() if x is not None}
    for _ in range(K):
        ids = torch.tensor([seq])
        S = ids.shape[1]
        mask = torch.ones(S, S, dtype=torch.bool).triu(1)[None, None]
        if omni is not None:
            v = omni_vocab(*omni)
            pos, _ = mrope_position_ids(ids, m.get("image_grid_thw"), None, image_token_id=v.image_pad_id,
                                        video_token_id=v.video_pad_id,
                                        spatial_merge_size=omni[1].vision.spatial_merge_size)
            logits = model(ids, pos, mask, **m)
        else:
            logits = model(ids, None, mask)
        last = logits[0, -1, :vocab_size].float()
        last[list(banned)] = float("-inf")
        tok = int(last.argmax())
        logprobs.append(float(torch.log_softmax(last, -1)[tok]))
        seq.append(tok)
    return {"tokens": seq[len(prompt):], "logprobs": logprobs}


def run_layout(res, name, llm, omni, with_omni: bool):
    lp = llama_prompts(llm.vocab_size)
    chunks = build("llama", llm, omni)
    greedy = generate(chunks, lp, GREEDY)
    res[f"{name}/llama/greedy"] = as_lists(greedy)
    res[f"{name}/llama/sampled"] = as_lists(generate(chunks, lp, SAMPLED))
    stop = int(greedy.tokens[0, 2])
    res[f"{name}/llama/stop"] = {"stop_id": stop, **as_lists(generate(
        chunks, lp, dataclasses.replace(GREEDY, stop_ids=(stop,), pad_id=0)))}
    res[f"{name}/llama/greedy_s"] = greedy.elapsed_s
    if with_omni:
        op, om = omni_prompts(llm, omni)
        ochunks = build("omni", llm, omni)
        out = generate(ochunks, op, GREEDY, media=om)
        res[f"{name}/omni/greedy"] = as_lists(out)
        res[f"{name}/omni/greedy_s"] = out.elapsed_s
        bf = build("llama", llm, omni, torch.bfloat16)
        res[f"{name}/llama_bf16/greedy"] = as_lists(generate(bf, lp, GREEDY))
        obf = build("omni", llm, omni, torch.bfloat16)
        res[f"{name}/omni_bf16/greedy"] = as_lists(generate(obf, op, GREEDY, media=om))


def main(out_path: str) -> None:
    global PARALLEL
    llm, omni = configs()
    res = {}
    for name, parallel in (("tp2pp2", ParallelConfig(tp=2, pp=2)), ("tp2pp2vpp2", ParallelConfig(tp=2, pp=2, vpp=2))):
        PARALLEL = parallel
        initialize_distributed(parallel)
        set_random_seeds(0)
        run_layout(res, name, llm, omni, with_omni=parallel.vpp is None)
    PARALLEL = ParallelConfig()
    initialize_distributed(PARALLEL)  # TP1 PP1: rank 0 is "the single rank", the others wait
    if dist.get_rank() == 0:
        run_layout(res, "single", llm, omni, with_omni=True)
        (model,) = build("llama", llm, omni)
        res["recompute/llama"] = [recompute_greedy(model, p, None, llm.vocab_size) for p in llama_prompts(llm.vocab_size)]
        (omodel,) = build("omni", llm, omni)
        v = omni_vocab(llm, omni)
        op, om = omni_prompts(llm, omni)
        res["recompute/omni"] = [recompute_greedy(omodel, p, m, v.size, v.placeholder_ids, omni=(llm, omni))
                                 for p, m in zip(op, om)]
        Path(out_path).write_text(json.dumps(res))
    dist.barrier()


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    finally:
        from megatron_omni.parallel.initialize import destroy_distributed

        destroy_distributed()
