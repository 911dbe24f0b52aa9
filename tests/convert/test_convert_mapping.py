"""The pieces, without megatron: transforms, the Llama table and config adapter, the safetensors streams."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_omni.config.schema import ModelConfig
from megatron_omni.convert import ConversionError
from megatron_omni.convert.llama import LLAMA, config_from_hf, config_to_hf
from megatron_omni.convert.mapping import GATE_UP, QKV, VOCAB_PAD, Dims
from megatron_omni.convert.safetensors_io import (
    SafetensorsFormatError,
    SafetensorsReader,
    StreamingWriter,
    read_header,
)
from tests.helpers.launch import REPO


def _dims(heads, groups, head_dim=16, hidden=64, vocab=100, padded=128):
    return Dims(hidden=hidden, ffn=176, vocab=vocab, padded_vocab=padded, heads=heads, groups=groups,
                head_dim=head_dim, layers=2)


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (4, 1), (8, 2)])
def test_qkv_interleave_groups_heads_like_megatron(heads, groups):
    d = _dims(heads, groups)
    q = torch.randn(heads * 16, 64)
    k = torch.randn(groups * 16, 64)
    v = torch.randn(groups * 16, 64)
    fused = QKV.to_mcore([q, k, v], d)
    assert tuple(fused.shape) == QKV.mcore_shape([q.shape, k.shape, v.shape], d)
    per = heads // groups
    blocks = fused.view(groups, per + 2, 16, 64)  # megatron: per group [q heads of the group, k, v]
    for g in range(groups):
        for j in range(per):
            assert torch.equal(blocks[g, j], q.view(heads, 16, 64)[g * per + j])  # HF head g*per+j uses kv g
        assert torch.equal(blocks[g, per], k.view(groups, 16, 64)[g])
        assert torch.equal(blocks[g, per + 1], v.view(groups, 16, 64)[g])
    back = QKV.to_hf(fused, d)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))


def test_gate_up_and_vocab_padding_are_exact_inverses():
    d = _dims(4, 2)
    gate, up = torch.randn(176, 64), torch.randn(176, 64)
    fc1 = GATE_UP.to_mcore([gate, up], d)
    assert torch.equal(fc1[:176], gate) and torch.equal(fc1[176:], up)
    assert all(torch.equal(a, b) for a, b in zip(GATE_UP.to_hf(fc1, d), (gate, up)))
    emb = torch.randn(100, 64, dtype=torch.bfloat16)
    padded = VOCAB_PAD.to_mcore([emb], d)
    assert padded.shape == (128, 64) and not padded[100:].any() and torch.equal(padded[:100], emb)
    assert torch.equal(VOCAB_PAD.to_hf(padded, d)[0], emb)


def test_table_covers_every_megatron_parameter_name():
    """Each local-spec and TE parameter name maps to exactly one rule, with the TP axis megatron uses."""
    names = {
        "embedding.word_embeddings.weight": 0, "decoder.final_layernorm.weight": None, "output_layer.weight": 0,
        "decoder.layers.3.input_layernorm.weight": None,
        "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight": None,
        "decoder.layers.3.self_attention.linear_qkv.weight": 0, "decoder.layers.3.self_attention.linear_proj.weight": 1,
        "decoder.layers.3.pre_mlp_layernorm.weight": None, "decoder.layers.3.mlp.linear_fc1.layer_norm_weight": None,
        "decoder.layers.3.mlp.linear_fc1.weight": 0, "decoder.layers.3.mlp.linear_fc2.weight": 1,
    }
    for name, axis in names.items():
        rule, layer = LLAMA.rule_for_param(name)
        assert rule.tp_axis == axis, name
        assert layer == (3 if ".layers." in name else None)
    assert LLAMA.rule_for_param("decoder.layers.0.self_attention.q_layernorm.weight") is None


def test_bindings_cover_hf_names_once():
    model = ModelConfig(num_layers=3, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2,
                        vocab_size=100, tie_word_embeddings=False)
    bindings = LLAMA.bindings(model, Dims.of(model))
    names = [n for b in bindings for n in b.hf_names]
    assert len(names) == len(set(names)) == 2 + 1 + 3 * 9
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "lm_head.weight"
    tied = LLAMA.bindings(ModelConfig(**{**model.__dict__, "tie_word_embeddings": True}), Dims.of(model))
    assert "lm_head.weight" not in [n for b in tied for n in b.hf_names]


LLAMA31_8B = {  # meta-llama/Llama-3.1-8B config.json, transformers 4.x spelling
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
}


def test_llama31_config_matches_the_repo_model_config():
    from megatron_omni.config import load_config

    ours = config_from_hf(LLAMA31_8B)
    repo = load_config(None, [f"model={REPO}/configs/model/llama3_8b.yaml"]).model
    for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                  "vocab_size", "max_position_embeddings", "rotary_base", "rope_scaling", "rope_scaling_factor",
                  "norm_epsilon", "tie_word_embeddings", "head_dim"):
        assert getattr(ours, field) == getattr(repo, field), field


def test_config_round_trip_and_transformers_reads_it():
    from transformers import LlamaConfig

    model = config_from_hf(LLAMA31_8B)
    out = config_to_hf(model, dtype="bfloat16", template=LLAMA31_8B)
    assert config_from_hf(out) == model
    assert out["bos_token_id"] == 128000 and out["eos_token_id"] == 128001
    v5_only = {k: v for k, v in out.items() if k not in ("rope_scaling", "rope_theta")}
    assert config_from_hf(v5_only) == model  # transformers 5.x spelling (rope_parameters) alone
    hf = LlamaConfig(**out)
    assert hf.rope_parameters["rope_type"] == "llama3" and hf.rope_parameters["factor"] == 8.0
    assert hf.rope_parameters["rope_theta"] == 500000.0


def test_llama3_scaling_without_original_length_uses_max_positions():
    """As transformers does: a missing original_max_position_embeddings defaults to max_position_embeddings,
    which megatron (fixed at 8192) only matches if it is 8192."""
    cfg = json.loads(json.dumps(LLAMA31_8B))
    del cfg["rope_scaling"]["original_max_position_embeddings"]
    with pytest.raises(ConversionError, match="original_max_position_embeddings=131072"):
        config_from_hf(cfg)
    cfg["max_position_embeddings"] = 8192
    assert config_from_hf(cfg).rope_scaling


def test_streaming_writer_matches_the_safetensors_library(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {"a": torch.randn(3, 5, dtype=torch.bfloat16), "b": torch.arange(7, dtype=torch.int64),
               "c": torch.randn(2, 2, 2), "empty": torch.empty(0, 4)}
    entries = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    writer = StreamingWriter(str(tmp_path / "ours.safetensors"), entries)
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()
    back = load_file(tmp_path / "ours.safetensors")
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors.items())
    save_file(tensors, tmp_path / "lib.safetensors")
    infos, meta = read_header(str(tmp_path / "lib.safetensors"))
    reader = SafetensorsReader()
    assert all(torch.equal(reader.read(infos[k]), v) for k, v in tensors.items())
    reader.close()


def test_truncated_and_padded_files_are_detected(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "x.safetensors"
    save_file({"w": torch.randn(16, 16)}, path)
    size = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(SafetensorsFormatError, match="trailing bytes"):
        read_header(str(path))
    with open(path, "r+b") as f:
        f.truncate(size - 4)
    with pytest.raises(SafetensorsFormatError, match="truncated: header declares 1024 bytes of tensor data"):
        read_header(str(path))
    with open(path, "r+b") as f:
        f.truncate(20)
    with pytest.raises(SafetensorsFormatError, match="truncated or not safetensors"):
        read_header(str(path))
