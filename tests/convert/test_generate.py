"""Generation (megatron_omni.inference, tools/generate.py) in one 4-rank world (generate_world.py).

* The CLI contract: `tools/generate.py --prompt-ids --output` at TP2xPP2 on the converted HF Llama
  == transformers' `generate(do_sample=False)`, stop token and EOS padding included.
* Prompts of different lengths in one batch (left padding) from the converted checkpoint: KV-cached
  greedy generation at TP2xPP2, TP2xPP2xVPP2 and on one rank == the no-cache full-recompute greedy
  loop == transformers, token for token; log-probs == the recompute's full-vocabulary log-softmax.
* The omni model with image / audio / text / image+audio prompts (M-RoPE ids continued by the
  deltas rule): TP2xPP2 and TP2xPP2xVPP2 == one rank == the no-cache recompute (positions
  recomputed from scratch).
* Seeded temperature/top-k/top-p sampling draws the same tokens at every layout; stop ids end rows;
  bf16 generates at TP2xPP2 and on one rank.
* A GSPO step of the tiny stage (rollouts, rewards, the GSPO loss through megatron's schedule) at
  TP2xPP2 == the same step on one rank (this process): rollouts, loss, every gradient (1e-5).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.helpers.launch import torchrun

LAYOUTS = ("tp2pp2", "tp2pp2vpp2", "single")
K = 8
CLI_K = 10
CLI_PROMPT = 12


@pytest.fixture(scope="module")
def hf(gqa):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gqa["dir"], dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def world(gqa, hf, demo_data):
    """Runs the world; the CLI's stop id is transformers' 4th greedy token of row 0 (so row 0 stops)."""
    ids = gqa["ids"][:, :CLI_PROMPT]
    with torch.no_grad():
        free = hf.generate(torch.from_numpy(ids), do_sample=False, max_new_tokens=CLI_K, min_new_tokens=CLI_K)
    stop = int(free[0, CLI_PROMPT + 3])
    work = gqa["work"]
    np.save(work / "gen_ids.npy", ids)
    proc = torchrun(4, ["tests/convert/generate_world.py", str(work / "gen.json"), str(gqa["ckpt"]), str(demo_data),
                        "--prompt-ids", str(work / "gen_ids.npy"), "--output", str(work / "gen_out.npy"),
                        "--max-new-tokens", str(CLI_K), "--greedy", "--stop-ids", str(stop)], timeout=600)
    res = json.loads((work / "gen.json").read_text())
    res["gspo"] = torch.load(work / "gen.json.gspo.pt")
    res["cli"] = {"ids": ids, "stop": stop, "out": np.load(work / "gen_out.npy"), "stdout": proc.stdout}
    return res


def test_generate_cli_matches_transformers_generate(world, hf):
    cli = world["cli"]
    with torch.no_grad():
        ref = hf.generate(torch.from_numpy(cli["ids"]), do_sample=False, max_new_tokens=CLI_K,
                          eos_token_id=cli["stop"], pad_token_id=cli["stop"])[:, CLI_PROMPT:].numpy()
    ref = np.pad(ref, ((0, 0), (0, CLI_K - ref.shape[1])), constant_values=cli["stop"])  # HF stops when all rows did
    got = cli["out"]
    assert got.dtype == np.int64 and got.shape == (2, CLI_K)
    assert (got == ref).all(), f"megatron {got.tolist()} vs transformers {ref.tolist()}"
    assert (got[0, 4:] == cli["stop"]).all()  # row 0 stopped after 4 tokens, EOS-padded
    assert "tokens/s" in cli["stdout"]


def test_ragged_batch_matches_transformers_per_prompt(world, hf):
    """Each prompt alone (no padding) through transformers == its row of the left-padded batch."""
    with torch.no_grad():
        ref = [hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=K, min_new_tokens=K)[0, len(p):].tolist()
               for p in world["llama_prompts"]]
    assert len({len(p) for p in world["llama_prompts"]}) == 3
    for layout in LAYOUTS:
        assert world[f"{layout}/llama/greedy"]["tokens"] == ref, layout


def test_greedy_equals_single_rank_and_full_recompute(world):
    ref = {"llama": [r["tokens"] for r in world["recompute/llama"]],
           "omni": [r["tokens"] for r in world["recompute/omni"]]}
    for model in ("llama", "omni"):
        for layout in LAYOUTS:
            key = f"{layout}/{model}/greedy"
            if key not in world:
                continue
            assert world[key]["tokens"] == ref[model], f"{key} differs from the no-cache recompute"
            assert world[key]["lengths"] == [8] * len(ref[model])
    assert "tp2pp2/omni/greedy" in world and "tp2pp2vpp2/omni/greedy" in world


def test_greedy_logprobs_equal_the_training_forwards(world):
    """log-probs (default logprobs_over="model") == log_softmax over every output logit of the
    no-cache recompute == -(the training forward's per-token cross entropy): pi_old of GSPO."""
    for model in ("llama", "omni"):
        ref = np.array([r["logprobs"] for r in world[f"recompute/{model}"]])
        train = np.array([r["train_logprobs"] for r in world[f"recompute/{model}"]])
        np.testing.assert_allclose(train, ref, atol=1e-5, err_msg=model)
        for layout in ("tp2pp2", "single"):
            got = np.array(world[f"{layout}/{model}/greedy"]["logprobs"])
            np.testing.assert_allclose(got, ref, atol=1e-4, err_msg=f"{layout}/{model}")


def test_seeded_sampling_is_layout_invariant(world):
    single = world["single/llama/sampled"]
    greedy = world["single/llama/greedy"]["tokens"]
    assert single["tokens"] != greedy  # it samples
    for layout in ("tp2pp2", "tp2pp2vpp2"):
        got = world[f"{layout}/llama/sampled"]
        assert got["tokens"] == single["tokens"], layout
        np.testing.assert_allclose(got["logprobs"], single["logprobs"], atol=1e-4)
    assert all(lp <= 0 for row in single["logprobs"] for lp in row)


def test_stop_ids_end_rows_and_pad(world):
    greedy = world["single/llama/greedy"]["tokens"]
    for layout in LAYOUTS:
        run = world[f"{layout}/llama/stop"]
        stop = run["stop_id"]
        for row, full, length, lps in zip(run["tokens"], greedy, run["lengths"], run["logprobs"]):
            n = full.index(stop) + 1 if stop in full else len(full)
            assert length == n and row[:n] == full[:n] and row[n:] == [0] * (len(full) - n), layout
            assert lps[n:] == [0.0] * (len(full) - n)
        assert min(run["lengths"]) < K  # the stop id (row 0's 3rd greedy token) ended a row early


def test_bf16_generates(world):
    for layout in ("tp2pp2", "single"):
        for model, vocab in (("llama", 2101), ("omni", None)):
            run = world[f"{layout}/{model}_bf16/greedy"]
            fp32 = world[f"{layout}/{model}/greedy"]["tokens"]
            assert run["lengths"] == [8] * len(fp32)
            assert all(0 <= t < (vocab or 10 ** 6) for row in run["tokens"] for t in row)
            assert all(math.isfinite(lp) and lp <= 0 for row in run["logprobs"] for lp in row)
            # the prefill's choice survives bf16 rounding unless fp32 had a near tie there (a random tiny
            # model's logits are not always peaked): then bf16's token is about as likely as fp32's
            fp32_lp = world[f"{layout}/{model}/greedy"]["logprobs"]
            for b, (row, ref) in enumerate(zip(run["tokens"], fp32)):
                if row[0] != ref[0]:
                    assert abs(run["logprobs"][b][0] - fp32_lp[b][0]) < 0.05, (layout, model, b, row[0], ref[0])
            assert sum(r[0] == f[0] for r, f in zip(run["tokens"], fp32)) >= len(fp32) - 1, f"{layout}/{model}"


def test_gspo_step_tp2pp2_equals_single_rank(world, demo_data, tmp_path):
    """The same rollouts (seeded sampling is layout-invariant), loss and gradients (rel. 1e-5) as one rank."""
    from megatron_omni.convert.mcore_io import megatron_world
    from tests.rl.gspo_grad_step import gspo_grad_step, gspo_step_config

    with megatron_world():
        ref = gspo_grad_step(gspo_step_config(str(demo_data), str(tmp_path)))
    got = world["gspo"]
    assert ref["rollouts"] == got["rollouts"] == 8 and len(ref["modalities"]) >= 2
    assert torch.equal(got["tokens"], ref["tokens"])
    assert 0 < ref["clip_fraction"] < 1  # both sides of GSPO's clip are exercised
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5) and ref["loss"] != 0
    assert set(got["grads"]) == set(ref["grads"])
    for name, g_ref in ref["grads"].items():
        scale = max(g_ref.abs().max().item(), 1e-12)
        assert (got["grads"][name] - g_ref).abs().max().item() <= 1e-5 * scale, name
    assert any(ref["grads"][n].abs().max() > 0 for n in ref["grads"] if n.startswith("vision.merger"))
