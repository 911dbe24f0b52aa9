"""More GQA ratios and embedding kinds: heads/groups 4/4 with tied embeddings (Llama-3.2 style) and
4/1 with head_dim != hidden/heads, each HF -> megatron (forward at TP1xPP2, so the tied output layer
is a replica on the last pipeline stage) == transformers, and back to HF bit-identical."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.convert.convert_helpers import convert_many
from tests.helpers.launch import REPO, torchrun

ATOL = 1e-4
VARIANTS = {"mha_tied": dict(tp=2, pp=2), "mqa": dict(tp=1, pp=2)}  # the layout each is converted for


def _with_extras(src, dst):
    """A copy of a tied model whose files also hold lm_head.weight (== the embedding, as some exports
    do) and old-style RoPE buffers: both accepted, neither converted."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    tensors = load_file(dst / first)
    embed_file = index["weight_map"]["model.embed_tokens.weight"]
    tensors["lm_head.weight"] = load_file(dst / embed_file)["model.embed_tokens.weight"].clone()
    for layer in range(4):
        tensors[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    save_file(tensors, dst / first, metadata={"format": "pt"})
    index["weight_map"].update({k: first for k in tensors})
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


@pytest.fixture(scope="module")
def variants(hf_models, tmp_path_factory):
    work = tmp_path_factory.mktemp("variants")
    calls = [("hf_to_mcore", dict(hf_dir=str(hf_models[n]["dir"]), out=str(work / n), **layout))
             for n, layout in VARIANTS.items()]
    extras = _with_extras(hf_models["mha_tied"]["dir"], work / "hf_extras")
    calls += [("hf_to_mcore", dict(hf_dir=str(extras), out=str(work / "extras"), tp=1, pp=1)),
              ("hf_to_mcore", dict(hf_dir=str(hf_models["mqa"]["dir"]), out=str(work / "mqa_bf16"), tp=1, pp=1,
                                   dtype="bf16"))]
    results = convert_many(calls)
    reports = dict(zip(list(VARIANTS) + ["extras", "mqa_bf16"], results))
    args = [str(REPO / "tools" / "forward.py")]
    for name in VARIANTS:  # both models in one TP1xPP2 launch
        args += ["--load", str(work / name), "--input-ids", str(hf_models[name]["ids_path"]),
                 "--output", str(work / f"{name}_logits.npy")]
    torchrun(2, args + ["parallel.tp=1", "parallel.pp=2"])
    out = {n: {**hf_models[n], "ckpt": work / n, "report": reports[n],
               "mc_logits": np.load(work / f"{n}_logits.npy")} for n in VARIANTS}
    out["extras"] = {"ckpt": work / "extras", "report": reports["extras"]}
    out["mqa_bf16"] = {"ckpt": work / "mqa_bf16", "report": reports["mqa_bf16"]}
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(variants, name):
    v = variants[name]
    assert v["mc_logits"].shape == v["logits"].shape
    err = float(np.abs(v["mc_logits"] - v["logits"]).max())
    print(f"{name}: max|d| logits TP1xPP2 vs transformers {err:.3e}")
    assert err <= ATOL


def test_tied_checkpoint_has_no_output_layer(variants):
    from megatron_omni.convert.mcore_io import CheckpointReader

    keys = CheckpointReader(str(variants["mha_tied"]["ckpt"])).model_keys()
    assert "embedding.word_embeddings.weight" in keys and "output_layer.weight" not in keys
    assert "output_layer.weight" in CheckpointReader(str(variants["mqa"]["ckpt"])).model_keys()
    assert variants["mha_tied"]["report"]["padded_vocab"] == 1024  # 1001 padded to a multiple of 128 x 2


@pytest.mark.parametrize("name", list(VARIANTS))
def test_round_trip_bit_identical(variants, name, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_omni.convert import mcore_to_hf

    v = variants[name]
    mcore_to_hf(str(v["ckpt"]), str(tmp_path / "hf"))
    original, back = {}, {}
    for f in v["dir"].glob("*.safetensors"):
        original.update(load_file(f))
    for f in (tmp_path / "hf").glob("*.safetensors"):
        back.update(load_file(f))
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k], original[k]) for k in original)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    src = json.loads((v["dir"] / "config.json").read_text())
    assert model.config.tie_word_embeddings == src["tie_word_embeddings"]
    assert model.config.head_dim == src["head_dim"] and model.config.rope_parameters == src["rope_parameters"]


def test_export_with_a_mismatched_model_config_is_refused(variants, tmp_path):
    import yaml

    from megatron_omni.convert import ConversionError, mcore_to_hf

    ckpt = variants["mqa"]["ckpt"]
    cfg = yaml.safe_load((ckpt / "model.yaml").read_text())
    cfg.update(ffn_hidden_size=160, num_layers=3)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConversionError) as e:
        mcore_to_hf(str(ckpt), str(tmp_path / "hf"), model_yaml=str(wrong))
    mismatches = "\n".join(e.value.problems["shape mismatches"])
    assert "decoder.layers.mlp.linear_fc1.weight: checkpoint has [4, 352, 64], the model config implies [3, 320, 64]" \
        in mismatches
    assert not (tmp_path / "hf").exists()


def test_reshard_to_an_impossible_layout_is_refused(variants, tmp_path):
    from megatron_omni.convert import ConversionError, reshard

    with pytest.raises(ConversionError) as e:
        reshard(str(variants["mqa"]["ckpt"]), str(tmp_path / "x"), tp=2, pp=1)  # 1 key/value head
    assert "num_query_groups (key/value heads)=1 is not divisible by tp=2" in str(e.value)
    assert not (tmp_path / "x").exists()


def test_tied_lm_head_copy_and_rope_buffers_are_accounted_for(variants, hf_models, tmp_path):
    from safetensors.torch import load_file

    from megatron_omni.convert import mcore_to_hf

    notes = "\n".join(variants["extras"]["report"]["notes"])
    assert "lm_head.weight is an exact copy of model.embed_tokens.weight" in notes
    assert "dropped 4 tensor(s) like model.layers.0.self_attn.rotary_emb.inv_freq" in notes
    mcore_to_hf(str(variants["extras"]["ckpt"]), str(tmp_path / "hf"))
    back = {}
    for f in (tmp_path / "hf").glob("*.safetensors"):
        back.update(load_file(f))
    assert "lm_head.weight" not in back and not any("rotary_emb" in k for k in back)


def test_dtype_cast_on_import(variants, hf_models, tmp_path):
    """--dtype bf16 from fp32 weights: the checkpoint is bf16, and exports back as exactly the rounded weights."""
    from safetensors.torch import load_file

    from megatron_omni.convert import mcore_to_hf
    from megatron_omni.convert.mcore_io import CheckpointReader

    reader = CheckpointReader(str(variants["mqa_bf16"]["ckpt"]))
    assert {reader.tensors[k][1] for k in reader.model_keys()} == {torch.bfloat16}
    rep = mcore_to_hf(str(variants["mqa_bf16"]["ckpt"]), str(tmp_path / "hf"), dtype="fp32",
                      max_shard_size="200KB")
    assert rep["dtype"] == "float32"
    original = load_file(hf_models["mqa"]["dir"] / "model.safetensors")
    back = {}
    files = list((tmp_path / "hf").glob("*.safetensors"))
    assert len(files) > 1  # sharded by --max-shard-size
    for f in files:
        back.update(load_file(f))
    assert all(torch.equal(back[k], original[k].to(torch.bfloat16).float()) for k in original)
