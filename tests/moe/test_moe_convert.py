"""HF conversion of the MoE backbone (convert/moe.py) through the declarative converter.

* Qwen2-MoE (no null experts, top-k, gated shared expert): transformers' Qwen2MoeForCausalLM ->
  megatron (written for EP=2) -> megatron forward == transformers logits; -> HF again bit-identical.
* With null experts and top-p routing (no transformers class): HF layout -> megatron -> HF round
  trip is lossless and the routing options survive.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_omni.config import load_config
from megatron_omni.convert.errors import ConversionError
from megatron_omni.convert.mapping import Dims
from megatron_omni.convert.moe import NULL_MOE, QWEN2_MOE_TABLE, config_from_hf, config_to_hf, is_qwen2_moe
from tests.convert.convert_helpers import convert_many, forward
from tests.moe.moe_helpers import TINY_RUN

ATOL = 1e-4


def _tensors(folder: Path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _make_qwen2_moe(path: Path) -> Path:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=176, moe_intermediate_size=48,
        shared_expert_intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, qkv_bias=False, norm_topk_prob=False, rms_norm_eps=1e-5,
        initializer_range=0.08, max_position_embeddings=4096, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
    )
    model = Qwen2MoeForCausalLM(cfg).float()
    with torch.no_grad():  # norms away from 1, so a misplaced norm shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
    model.save_pretrained(path, max_shard_size="200KB")
    return path


def test_qwen2_moe_logits_and_round_trip(tmp_path):
    pytest.importorskip("transformers.models.qwen2_moe")
    from transformers import AutoModelForCausalLM

    hf = _make_qwen2_moe(tmp_path / "hf")
    ids = np.random.default_rng(0).integers(0, 1000, size=(2, 32), dtype=np.int64)
    np.save(tmp_path / "ids.npy", ids)
    convert_many([
        ("hf_to_mcore", {"hf_dir": str(hf), "out": str(tmp_path / "mc"), "tp": 1, "pp": 1, "ep": 2}),
        ("mcore_to_hf", {"load": str(tmp_path / "mc"), "out": str(tmp_path / "hf2")}),
    ])
    model_yaml = (tmp_path / "mc" / "model.yaml").read_text()
    assert "num_experts: 4" in model_yaml and "shared_expert_gate: true" in model_yaml
    got = forward(tmp_path / "mc", tmp_path / "ids.npy", tmp_path / "logits.npy", tp=1, pp=1)
    ref_model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(ids)).logits.numpy()
    err = np.abs(got - ref).max()
    print(f"\nQwen2-MoE megatron vs transformers: max|d| {err:.2e} (logits up to {np.abs(ref).max():.2f})")
    assert got.shape == ref.shape and err <= ATOL
    a, b = _tensors(hf), _tensors(tmp_path / "hf2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2MoeForCausalLM"] and cfg["qkv_bias"] is False
    AutoModelForCausalLM.from_pretrained(tmp_path / "hf2")  # loads: no missing or unexpected keys


def test_null_expert_topp_layout_round_trip(tmp_path):
    from safetensors.torch import save_file

    model = dataclasses.replace(load_config(TINY_RUN).model, num_layers=2)
    model.moe = dataclasses.replace(model.moe, router_type="topp", router_topp=0.6)
    assert not is_qwen2_moe(model) and model.moe.num_null_experts == 2
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(config_to_hf(model, dtype="float32")))
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for b in QWEN2_MOE_TABLE.bindings(model, Dims.of(model)):
        for name, shape in zip(b.hf_names, b.hf_shapes):
            tensors[name] = torch.randn(shape, generator=gen)
    assert tensors["model.layers.1.mlp.gate.weight"].shape == (4 + 2, model.hidden_size)  # E + N router rows
    save_file(tensors, str(hf / "model.safetensors"))
    convert_many([
        ("hf_to_mcore", {"hf_dir": str(hf), "out": str(tmp_path / "mc"), "tp": 1, "pp": 1}),
        ("mcore_to_hf", {"load": str(tmp_path / "mc"), "out": str(tmp_path / "hf2")}),
    ])
    back = _tensors(tmp_path / "hf2")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    cfg = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert cfg["architectures"] == [NULL_MOE]
    assert config_from_hf(cfg).moe == model.moe  # null experts, top-p and p survive the trip


def test_unsupported_qwen2_moe_configs_are_listed():
    cfg = {"architectures": ["Qwen2MoeForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "vocab_size": 100, "num_experts": 4, "num_experts_per_tok": 2,
           "moe_intermediate_size": 32, "qkv_bias": True, "mlp_only_layers": [1]}
    with pytest.raises(ConversionError) as e:
        config_from_hf(cfg)
    assert "qkv_bias=true" in str(e.value) and "mlp_only_layers" in str(e.value)
    renorm = config_from_hf({**cfg, "qkv_bias": False, "mlp_only_layers": [], "norm_topk_prob": True})
    assert renorm.moe.router_pre_softmax is False  # renormalised top-k = megatron's top-k-then-softmax
