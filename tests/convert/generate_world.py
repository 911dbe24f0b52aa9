"""torchrun worker (4 ranks) of test_generate.py, one world for every generation check:

1. the `tools/generate.py --prompt-ids` contract at TP2xPP2 on the converted HF Llama checkpoint;
2. the same ragged prompts generated from that checkpoint at TP2xPP2, TP2xPP2xVPP2 and on one rank
   (greedy, seeded sampling, stop ids, bf16), plus the no-cache full-recompute greedy reference;
3. the omni model (layout-invariant init, models/init.py: bit-identical weights at every layout) with
   image / audio / text / image+audio prompts at TP2xPP2, TP2xPP2xVPP2 and on one rank, plus its
   recompute reference.  Init std 0.3 (not 0.02) gives peaked logits, so greedy choices are not near-ties.
4. one GSPO step of the tiny stage at TP2xPP2 on the demo data (tests/rl/gspo_grad_step.py: rollouts by
   `generate` on the training ranks, the GSPO loss through megatron's schedule, DDP's gradients).
Results -> JSON (rank 0), the GSPO step's loss and full gradients -> OUT.gspo.pt; the test compares
them with the single rank, and the Llama ones with transformers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from megatron_omni.config import ParallelConfig  # noqa: E402
from megatron_omni.config.loader import load_section_file  # noqa: E402
from megatron_omni.config.schema import ModelConfig, OmniConfig  # noqa: E402
from megatron_omni.inference.generate import PromptMedia, SamplingParams, generate  # noqa: E402
from megatron_omni.inference.load import inference_config, load_inference_model  # noqa: E402
from megatron_omni.config.encoders import audio_token_count  # noqa: E402
from megatron_omni.models.omni import build_omni_chunks, init_omni_weights_layout_invariant, omni_vocab  # noqa: E402
from megatron_omni.models.rope import mrope_position_ids  # noqa: E402
from megatron_omni.parallel.initialize import initialize_distributed, set_random_seeds  # noqa: E402

K = 8
SEED = 11
GREEDY = SamplingParams(max_new_tokens=K, greedy=True)
SAMPLED = SamplingParams(max_new_tokens=K, temperature=0.9, top_k=40, top_p=0.9, seed=5)


def omni_configs():
    llm = load_section_file(ModelConfig, str(REPO / "configs/model/tiny_llm.yaml"))
    llm = dataclasses.replace(llm, init_method_std=0.3)
    omni = load_section_file(OmniConfig, str(REPO / "configs/model/omni_tiny.yaml"))
    return llm, omni


def llama_prompts(vocab: int):
    """Three prompts of different lengths (left padding inside one batch)."""
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


def build_omni(llm, omni, parallel, dtype=torch.float32):
    chunks = build_omni_chunks(llm, parallel, omni, seq_length=64, params_dtype=dtype)
    init_omni_weights_layout_invariant(chunks, llm, omni, SEED)
    if dtype != torch.float32:
        from megatron.core.transformer.module import Float16Module

        chunks = [Float16Module(c.config, c) for c in chunks]
    return chunks


def init_layout(ckpt: str, layout):
    """The checkpoint's config at `layout` (parallel.* overrides, the CLI's loader) and its groups."""
    cfg = inference_config(ckpt, overrides=[*layout, "train.precision=fp32"])
    initialize_distributed(cfg.parallel)
    set_random_seeds(0)
    return cfg


def load_llama(cfg, ckpt: str, precision: str = "fp32"):
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
    return load_inference_model(cfg, ckpt, seq_length=64)


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
            # the training's packed-row path (THD, or the dense mask) on one segment
            mask, packed = model.packed_row_attention(torch.tensor([0, S], dtype=torch.int32), 1, S)
            logits = model(ids, pos, mask, packed_seq_params=packed, **m)
        else:
            logits = model(ids, None, mask)
        full = logits[0, -1].float()  # every output logit (TP padding rows included)
        last = full[:vocab_size].clone()
        last[list(banned)] = float("-inf")
        tok = int(last.argmax())
        logprobs.append(float(torch.log_softmax(full, -1)[tok]))
        seq.append(tok)
    # The training forward's own per-token loss (megatron's vocab-parallel cross entropy) on the
    # finished sequence: -loss at the generated positions is what GSPO's pi_old must equal.
    ids = torch.tensor([seq[:-1]])
    S = ids.shape[1]
    mask = torch.ones(S, S, dtype=torch.bool).triu(1)[None, None]
    labels = torch.tensor([seq[1:]])
    if omni is not None:
        mask, packed = model.packed_row_attention(torch.tensor([0, S], dtype=torch.int32), 1, S)
        loss = model(ids, pos[:, :, :S], mask, labels=labels, packed_seq_params=packed, **m)
    else:
        loss = model(ids, None, mask, labels=labels)
    ce = (-loss[0, len(prompt) - 1:]).tolist()
    return {"tokens": seq[len(prompt):], "logprobs": logprobs, "train_logprobs": ce}


def run_llama(res, name, vocab_size, chunks, bf16_chunks):
    lp = llama_prompts(vocab_size)
    res["llama_prompts"] = lp
    greedy = generate(chunks, lp, GREEDY)
    res[f"{name}/llama/greedy"] = as_lists(greedy)
    res[f"{name}/llama/greedy_s"] = greedy.elapsed_s
    res[f"{name}/llama/sampled"] = as_lists(generate(chunks, lp, SAMPLED))
    stop = int(greedy.tokens[0, 2])
    res[f"{name}/llama/stop"] = {"stop_id": stop, **as_lists(generate(
        chunks, lp, dataclasses.replace(GREEDY, stop_ids=(stop,), pad_id=0)))}
    if bf16_chunks is not None:
        res[f"{name}/llama_bf16/greedy"] = as_lists(generate(bf16_chunks, lp, GREEDY))


def run_omni(res, name, parallel):
    llm, omni = omni_configs()
    op, om = omni_prompts(llm, omni)
    out = generate(build_omni(llm, omni, parallel), op, GREEDY, media=om)
    res[f"{name}/omni/greedy"] = as_lists(out)
    res[f"{name}/omni/greedy_s"] = out.elapsed_s
    res[f"{name}/omni_bf16/greedy"] = as_lists(generate(build_omni(llm, omni, parallel, torch.bfloat16), op, GREEDY,
                                                        media=om))
    return llm, omni


def _phase(what: str, start=time.perf_counter()) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"[generate_world] {time.perf_counter() - start:6.1f}s {what}", flush=True)


def main(out_path: str, ckpt: str, demo_root: str, cli_args) -> None:
    res = {}
    _phase("start")
    # 1. the CLI contract, in this world (tools/generate.py's own run())
    spec = importlib.util.spec_from_file_location("generate_cli", REPO / "tools" / "generate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    cli.run(cli.parse_args(["--load", ckpt, *cli_args, "parallel.tp=2", "parallel.pp=2"]))
    _phase("cli")
    # 2. + 3. the layouts
    for name, layout in (("tp2pp2", ["parallel.tp=2", "parallel.pp=2"]),
                         ("tp2pp2vpp2", ["parallel.tp=2", "parallel.pp=2", "parallel.vpp=2"])):
        cfg = init_layout(ckpt, layout)
        bf16 = load_llama(cfg, ckpt, "bf16") if name == "tp2pp2" else None
        run_llama(res, name, cfg.model.vocab_size, load_llama(cfg, ckpt), bf16)
        _phase(f"{name} llama")
        run_omni(res, name, cfg.parallel)
        _phase(f"{name} omni")
    # 4. a GSPO step at TP2xPP2 (its own train state; the single rank runs in the test process)
    from tests.rl.gspo_grad_step import gspo_grad_step, gspo_step_config

    step = gspo_grad_step(gspo_step_config(demo_root, str(Path(out_path).parent / "gspo_tp2pp2"),
                                           ["parallel.tp=2", "parallel.pp=2"]))
    if step is not None:
        torch.save(step, f"{out_path}.gspo.pt")
    _phase("tp2pp2 gspo step")
    # TP1 PP1 (DP4): every rank loads, rank 0 is "the single rank".  The TP2 conversion padded the
    # vocabulary to a multiple of 2 x 128 rows; at TP1 the same padding needs a multiple of 256.
    cfg = init_layout(ckpt, ["model.make_vocab_size_divisible_by=256"])
    chunks, bf16 = load_llama(cfg, ckpt), load_llama(cfg, ckpt, "bf16")
    _phase("single load")
    if dist.get_rank() == 0:
        run_llama(res, "single", cfg.model.vocab_size, chunks, bf16)
        res["recompute/llama"] = [recompute_greedy(chunks[0], p, None, cfg.model.vocab_size)
                                  for p in res["llama_prompts"]]
        _phase("single llama + recompute")
        llm, omni = run_omni(res, "single", cfg.parallel)
        _phase("single omni")
        (omodel,) = build_omni(llm, omni, cfg.parallel)
        v = omni_vocab(llm, omni)
        op, om = omni_prompts(llm, omni)
        res["recompute/omni"] = [recompute_greedy(omodel, p, m, v.size, v.placeholder_ids, omni=(llm, omni))
                                 for p, m in zip(op, om)]
        _phase("omni recompute")
        Path(out_path).write_text(json.dumps(res))
    dist.barrier()


if __name__ == "__main__":
    try:
        main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
    finally:
        from megatron_omni.parallel.initialize import destroy_distributed

        destroy_distributed()
