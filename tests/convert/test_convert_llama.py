"""HF Llama -> megatron-omni -> HF, verified against transformers.

One GQA model (heads/groups 4/2, odd vocab 2101, untied, Llama-3 RoPE scaling) goes through
the whole path: convert for TP2xPP2, megatron forward at TP2xPP2 == transformers (fp32,
max|d| <= 1e-4); export back to HF bit-identical and loadable with no missing/unexpected
keys; reshard to TP1xPP1 (vocab padding 2304 -> 2176) with the same logits; and a training
run from the converted checkpoint starts at step 1 with the HF model's loss on its batch.
The other GQA ratios (4/4 tied, 4/1) are in test_convert_variants.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.convert.convert_helpers import convert, report
from tests.helpers.launch import REPO, TINY, metrics, train

ATOL = 1e-4


def test_converted_checkpoint_layout(gqa):
    ckpt = gqa["ckpt"]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "0"
    assert (ckpt / "iter_0000000" / "metadata.json").is_file()
    assert (ckpt / "model.yaml").is_file() and (ckpt / "hf_source" / "config.json").is_file()
    assert not list(ckpt.parent.glob(".*partial*")), "temporary folder left behind"
    conv = json.loads((ckpt / "conversion.json").read_text())
    assert conv["layout"]["tp"] == 2 and conv["padded_vocab_size"] == 2304 and conv["vocab_size"] == 2101
    assert gqa["report"]["padded_vocab"] == 2304


def test_tp2pp2_logits_match_transformers(gqa):
    hf, mc = gqa["logits"], gqa["mc_logits"]
    assert mc.shape == hf.shape == (2, 32, 2101)  # vocabulary padding removed
    err = float(np.abs(hf - mc).max())
    print(f"max|d| logits TP2xPP2 vs transformers: {err:.3e}")
    assert err <= ATOL
    assert (hf.argmax(-1) == mc.argmax(-1)).all()


def test_export_round_trip_is_bit_identical(gqa, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_omni.convert import mcore_to_hf

    out = tmp_path / "hf_back"
    tok = tmp_path / "tokenizer"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "tokenizer_config.json").write_text("{}")
    rep = mcore_to_hf(str(gqa["ckpt"]), str(out), tokenizer_dir=str(tok), max_shard_size="300KB")
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    original, back = {}, {}
    for f in gqa["dir"].glob("*.safetensors"):
        original.update(load_file(f))
    for f in out.glob("*.safetensors"):
        back.update(load_file(f))
    assert sorted(back) == sorted(original)
    for name, t in original.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    src_cfg = json.loads((gqa["dir"] / "config.json").read_text())
    assert model.config.rope_parameters == src_cfg["rope_parameters"]
    for key in ("vocab_size", "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings",
                "bos_token_id", "eos_token_id"):
        assert getattr(model.config, key) == src_cfg[key], key
    assert (out / "generation_config.json").is_file()
    assert rep["notes"] == ["dropped vocabulary padding rows 2101..2303"]


def test_reshard_to_tp1pp1_same_logits(gqa):
    """Reshard, then the one-command comparison (tools/compare_hf.py) at TP1xPP1."""
    out = gqa["work"] / "mcore_tp1pp1"
    rep = report(convert("reshard", "--load", str(gqa["ckpt"]), "--out", str(out), "--tp", "1", "--pp", "1"))
    assert rep["padded_vocab"] == 2176  # 2101 padded for TP1 instead of TP2
    keep = gqa["work"] / "compare_tp1"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "compare_hf.py"), "--hf-dir", str(gqa["dir"]),
                           "--load", str(out), "--tp", "1", "--pp", "1", "--input-ids", str(gqa["ids_path"]),
                           "--max-abs", str(ATOL), "--keep", str(keep)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1][len("RESULT "):])
    print(proc.stdout)
    assert result["pass"] and result["top1"] == 1.0 and result["cosine_min"] > 0.99999
    logits = np.load(keep / "mcore_logits.npy")
    assert float(np.abs(logits - gqa["mc_logits"]).max()) <= 1e-5  # TP1xPP1 == TP2xPP2
    assert float(np.abs(logits - gqa["logits"]).max()) <= ATOL


def _hf_loss_on_first_batch(cfg, hf_dir, padded_vocab: int) -> float:
    """Mean token loss of the HF model on the first global batch the training run reads, with the
    softmax over megatron's padded vocabulary: the padding rows of the converted output layer are
    zero, so megatron's (unmasked) vocab-parallel cross entropy sees logit 0 for each of them."""
    from transformers import AutoModelForCausalLM

    from megatron_omni.data import collate_text_samples
    from megatron_omni.training.text_data import build_text_data

    data = build_text_data(cfg)
    batch = collate_text_samples([data.train[i] for i in range(cfg.train.global_batch_size)])
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(batch["tokens"]).logits.double()
    padded = torch.cat([logits, logits.new_zeros(logits.shape[:-1] + (padded_vocab - logits.shape[-1],))], -1)
    token_loss = torch.logsumexp(padded, -1) - padded.gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
    mask = batch["loss_mask"].double()
    return float((token_loss * mask).sum() / mask.sum())


def test_training_starts_from_converted_checkpoint(gqa, tmp_path, data_cache):
    from megatron_omni.config import load_config

    out = tmp_path / "run"
    overrides = [f"model={gqa['ckpt'] / 'model.yaml'}", f"train.load={gqa['ckpt']}", "train.steps=1",
                 "optimizer.lr_warmup_steps=0",
                 "parallel.tp=2", "parallel.pp=2"]
    proc = train(4, out, overrides, cache_dir=data_cache)
    assert "weights only" in proc.stdout
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1]
    cfg = load_config(str(REPO / "configs/tiny/llm.yaml"),
                      TINY + [f"data.cache_dir={data_cache}", f"train.output_dir={out}"] + overrides)
    expected = _hf_loss_on_first_batch(cfg, gqa["dir"], padded_vocab=2304)
    print(f"step-1 loss: megatron {rows[0]['loss']:.7f}, transformers {expected:.7f}")
    assert rows[0]["loss"] == pytest.approx(expected, rel=1e-5)

    # ... and the trained checkpoint goes back out to HF: weights only, model config from the run's config.yaml.
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_omni.convert import mcore_to_hf

    rep = mcore_to_hf(str(out / "checkpoints"), str(tmp_path / "released"), template_dir=str(gqa["dir"]))
    assert any("optimizer-state" in n for n in rep["notes"])
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "released", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.eos_token_id == 2
    before = load_file(next(gqa["dir"].glob("*00001*.safetensors")))
    after = {}
    for f in (tmp_path / "released").glob("*.safetensors"):
        after.update(load_file(f))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "one optimizer step should have changed the weights"

