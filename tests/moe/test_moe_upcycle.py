"""Sparse upcycling (tools/upcycle_moe.py's library): dense checkpoint -> MoE checkpoint.

A dense tiny model is saved as a distributed checkpoint, upcycled, and the MoE checkpoint is
loaded back into a freshly built MoE model: experts must equal the dense MLP (+ the requested
noise for routed experts), the router its seeded random start, everything else the dense weights.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from megatron_omni.config import load_config
from megatron_omni.convert.mcore_io import megatron_world
from megatron_omni.models.init import init_weights_layout_invariant
from megatron_omni.models.llama import build_llama_chunks
from megatron_omni.training.upcycle import (
    check_upcyclable,
    dense_model_of,
    dense_source,
    save_model_checkpoint,
    upcycle,
)
from megatron_omni.parallel.layout import global_named_parameters
from megatron_omni.training.checkpoint import load_checkpoint
from megatron_omni.training.setup import TrainState
from tests.moe.moe_helpers import TINY_RUN
from tests.helpers.launch import REPO

NOISE = 0.01


def _params(chunks):
    return {n: p.detach().clone() for c in chunks for n, p in global_named_parameters(c)}


def test_upcycled_checkpoint_holds_dense_mlp_copies(tmp_path):
    cfg = load_config(TINY_RUN)
    dense_model = dense_model_of(cfg.model)
    kw = dict(seq_length=64, params_dtype=torch.float32)
    with megatron_world():
        dense = build_llama_chunks(dense_model, cfg.parallel, **kw)
        init_weights_layout_invariant(dense, dense_model, seed=3)
        save_model_checkpoint(dense, str(tmp_path / "dense"))
        dense_w = _params(dense)

        upcycle(cfg, str(tmp_path / "dense"), str(tmp_path / "moe"), noise_std=NOISE)

        moe = build_llama_chunks(cfg.model, cfg.parallel, **kw)
        load_checkpoint(TrainState(model=moe, optimizer=None, scheduler=None), str(tmp_path / "moe"), finetune=True)
        got = _params(moe)
        fresh = build_llama_chunks(cfg.model, cfg.parallel, **kw)
        init_weights_layout_invariant(fresh, cfg.model, cfg.train.seed)
        random_start = _params(fresh)

    E = cfg.model.moe.num_experts
    for layer in range(cfg.model.num_layers):
        pre = f"decoder.layers.{layer}."
        for fc in ("linear_fc1", "linear_fc2"):
            ref = dense_w[f"{pre}mlp.{fc}.weight"]
            assert torch.equal(got[f"{pre}mlp.shared_experts.{fc}.weight"], ref)
            deltas = [got[f"{pre}mlp.experts.local_experts.{e}.{fc}.weight"] - ref for e in range(E)]
            for d in deltas:
                assert abs(d.std().item() - NOISE) < 0.15 * NOISE and abs(d.mean().item()) < 0.1 * NOISE
            assert not torch.equal(deltas[0], deltas[1])  # experts start different
        assert torch.equal(got[f"{pre}mlp.router.weight"], random_start[f"{pre}mlp.router.weight"])
        assert got[f"{pre}mlp.router.weight"].shape[0] == E + cfg.model.moe.num_null_experts
        for name in ("self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
                     "pre_mlp_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"):
            if pre + name in dense_w:
                assert torch.equal(got[pre + name], dense_w[pre + name]), name
    assert torch.equal(got["embedding.word_embeddings.weight"], dense_w["embedding.word_embeddings.weight"])
    assert torch.equal(got["output_layer.weight"], dense_w["output_layer.weight"])


def test_dense_source_names():
    names = {"decoder.layers.3.mlp.linear_fc1.weight"}
    assert dense_source("decoder.layers.3.mlp.experts.local_experts.7.linear_fc1.weight", names) == \
        "decoder.layers.3.mlp.linear_fc1.weight"
    assert dense_source("decoder.layers.3.mlp.experts.linear_fc2.weight12", names) == \
        "decoder.layers.3.mlp.linear_fc2.weight"  # TE grouped GEMM naming
    assert dense_source("decoder.layers.3.mlp.shared_experts.linear_fc1.weight", names) == \
        "decoder.layers.3.mlp.linear_fc1.weight"
    assert dense_source("decoder.layers.3.mlp.router.weight", names) is None
    assert dense_source("decoder.layers.3.mlp.shared_experts.gate_weight", names) is None
    assert dense_source("decoder.layers.3.pre_mlp_layernorm.weight", names) == \
        "decoder.layers.3.mlp.linear_fc1.layer_norm_weight"  # TE dense layer fuses it


def test_mismatched_widths_are_refused():
    model = load_config(TINY_RUN).model
    dense = dataclasses.replace(dense_model_of(model), ffn_hidden_size=model.moe.ffn_hidden_size * 2)
    with pytest.raises(ValueError, match="ffn_hidden_size"):
        check_upcyclable(dense, model)
    with pytest.raises(ValueError, match="num_layers"):
        check_upcyclable(dataclasses.replace(dense_model_of(model), num_layers=2), model)


def test_tool_reports_bad_input(tmp_path):
    proc = subprocess.run(
        [sys.executable, "tools/upcycle_moe.py", "--config", TINY_RUN, "--dense-load", str(tmp_path),
         "--out", str(tmp_path / "o"), "model.moe.ffn_hidden_size=32"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2 and "must equal the dense ffn_hidden_size" in proc.stderr, proc.stderr[-2000:]
