"""omni-from-hf (issue 13): random small HF parts (LlamaForCausalLM, Qwen2VLForConditionalGeneration,
WhisperModel) -> an omni checkpoint at TP2xPP2; its text logits equal transformers' Llama; the encoder
tensors are the sources' bit for bit; what no source has follows the stated rules; bad inputs are one
clear error and write nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_omni.convert.errors import ConversionError
from megatron_omni.convert.mcore_io import CheckpointReader
from megatron_omni.convert.omni_import import find_omni_config, omni_from_hf
from megatron_omni.convert.omni_mapping import audio_table, vision_table
from megatron_omni.models.omni_vocab import OmniVocab
from tests.convert.convert_helpers import SPECS, convert, forward, hf_logits, make_hf_llama
from tests.convert.omni_helpers import (
    edit_config,
    folder_tensors,
    make_hf_qwen2vl,
    make_hf_vision_tower,
    make_hf_whisper,
)

CODEBOOK = 64
SEED = 1234


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("omni_parts")
    return {"root": root, "llm": make_hf_llama(root / "llm", seed=0, **SPECS["gqa"]),
            "vision": make_hf_qwen2vl(root / "qwen2vl"), "audio": make_hf_whisper(root / "whisper")}


@pytest.fixture(scope="module")
def converted(parts):
    out = parts["root"] / "omni"
    convert("omni-from-hf", "--llm", str(parts["llm"]), "--vision", str(parts["vision"]), "--audio",
            str(parts["audio"]), "--out", str(out), "--tp", "2", "--pp", "2", "--audio-codebook-size", str(CODEBOOK))
    return out


def test_text_logits_equal_hf_llama_at_tp2_pp2(parts, converted, tmp_path):
    ids = np.random.default_rng(0).integers(0, 2101, size=(2, 24), dtype=np.int64)
    np.save(tmp_path / "ids.npy", ids)
    got = forward(converted, tmp_path / "ids.npy", tmp_path / "logits.npy", tp=2, pp=2)
    ref = hf_logits(parts["llm"], ids)
    assert got.shape == (2, 24, OmniVocab(2101, CODEBOOK).size)  # the whole omni vocabulary, text ids first
    assert np.abs(got[..., :2101] - ref).max() <= 1e-4


def test_encoder_tensors_bit_exact_and_report(parts, converted):
    model, omni = find_omni_config(str(converted))
    assert (omni.vision.depth, omni.vision.hidden_size, omni.vision.out_hidden_size) == (2, 32, 64)
    assert (omni.audio.encoder_type, omni.audio.num_layers, omni.audio.d_model) == ("whisper", 2, 32)
    assert omni.audio_codebook_size == CODEBOOK and sum(omni.mrope_section) * 2 == model.head_dim
    reader = CheckpointReader(str(converted))
    for table, folder, prefixes in ((vision_table(omni.vision), parts["vision"], ("model.visual.", "visual.")),
                                    (audio_table(omni.audio), parts["audio"], ("encoder.", "model.encoder."))):
        src = folder_tensors(folder)
        prefix = next(p for p in prefixes if p + table.bindings()[0].source[0] in src)
        for b in table.bindings():
            ours = reader.read({"t": (b.key, b.index)})["t"]
            for name, back in zip(b.source, b.to_source(ours)):
                assert torch.equal(back, src[prefix + name]), (b.key, b.index, name)
        if table.name == "whisper":  # the fused bias's key part is zero (Whisper's k_proj has no bias)
            bias = reader.read({"b": ("audio.decoder.layers.self_attention.linear_qkv.bias", None)})["b"]
            assert not bias.view(2, 4, 3, -1)[:, :, 1].any()

    report = json.loads((converted / "conversion_report.json").read_text())
    assert set(report["initialised"]) == {
        "audio.connector.linear_fc1.weight", "audio.connector.linear_fc1.bias", "audio.connector.linear_fc2.weight",
        "audio.connector.linear_fc2.bias", f"embedding.word_embeddings.weight[2101:{2101 + 17 + CODEBOOK}]",
        f"output_layer.weight[2101:{2101 + 17 + CODEBOOK}]"}
    dropped = report["dropped"]
    assert "vision:lm_head.weight" in dropped  # the Qwen2-VL language model (saved as model.* or model.language_model.*)
    assert any(k.startswith("vision:model.") and k.endswith("embed_tokens.weight") for k in dropped)
    assert "audio:decoder.layers.0.fc1.weight" in dropped and not any(k.startswith("llm:") for k in dropped)
    # every source tensor is either converted or listed as dropped
    vis = folder_tensors(parts["vision"])
    vprefix = next(p for p in ("model.visual.", "visual.") if p + "patch_embed.proj.weight" in vis)
    consumed = {vprefix + n for b in vision_table(omni.vision).bindings() for n in b.source}
    assert set(vis) == consumed | {k.split(":", 1)[1] for k in dropped if k.startswith("vision:")}

    # LLM vocabulary: text rows copied, omni rows = mean + small noise, TP padding zero
    emb = reader.read({"e": ("embedding.word_embeddings.weight", None)})["e"]
    hf_emb = folder_tensors(parts["llm"])["model.embed_tokens.weight"]
    n_omni = OmniVocab(2101, CODEBOOK).size
    assert emb.shape[0] == model.padded_vocab_size(2, n_omni) and torch.equal(emb[:2101], hf_emb)
    new = emb[2101:n_omni]
    assert (new - hf_emb.mean(0)).abs().max() <= 0.1 * hf_emb.std(0).max() and new.std(0).min() > 0
    assert not emb[n_omni:].any()


def test_connectors_follow_the_layout_invariant_init(converted):
    """The audio connector is exactly what init_omni_weights_layout_invariant gives a fresh model (seed SEED)."""
    from megatron_omni.config import ParallelConfig
    from megatron_omni.convert.mcore_io import megatron_world
    from megatron_omni.models.omni import build_omni_chunks, init_omni_weights_layout_invariant

    model, omni = find_omni_config(str(converted))
    reader = CheckpointReader(str(converted))
    with megatron_world():
        (fresh,) = build_omni_chunks(model, ParallelConfig(), omni, seq_length=32, params_dtype=torch.float32)
        init_omni_weights_layout_invariant([fresh], model, omni, seed=SEED)
        params = dict(fresh.named_parameters())
    for key in ("audio.connector.linear_fc1.weight", "audio.connector.linear_fc2.weight",
                "audio.connector.linear_fc2.bias"):
        assert torch.equal(reader.read({"t": (key, None)})["t"], params[key].detach()), key


def test_standalone_tower_with_another_merger_width(parts, tmp_path):
    """A vision-tower folder whose merger projects to 32 (the LLM is 64 wide): the tower is copied, the
    merger's last projection re-initialised (and its source reported dropped); 1 process, TP1."""
    tower = make_hf_vision_tower(tmp_path / "tower", hidden_size=32)
    report = omni_from_hf(str(parts["llm"]), str(tmp_path / "omni"), vision_dir=str(tower), audio_codebook_size=8)
    assert {"vision.merger.linear_fc2.weight", "vision.merger.linear_fc2.bias"} <= set(report["initialised"])
    assert {"vision:merger.mlp.2.weight", "vision:merger.mlp.2.bias"} == set(report["dropped"])
    _, omni = find_omni_config(str(tmp_path / "omni"))
    reader, src = CheckpointReader(str(tmp_path / "omni")), folder_tensors(tower)
    for b in vision_table(omni.vision).bindings():
        if not b.key.startswith("vision.merger.linear_fc2"):
            back = b.to_source(reader.read({"t": (b.key, b.index)})["t"])
            assert all(torch.equal(x, src[n]) for x, n in zip(back, b.source)), b.key
    assert reader.read({"w": ("vision.merger.linear_fc2.weight", None)})["w"].shape == (64, 128)


def test_whisper_for_conditional_generation_folder(tmp_path):
    """The encoder sits under model.encoder.; the decoder (and proj_out when saved) is dropped with a reason."""
    from transformers import WhisperForConditionalGeneration

    from megatron_omni.convert.omni_sources import open_audio

    make_hf_whisper(tmp_path / "w")
    WhisperForConditionalGeneration.from_pretrained(tmp_path / "w").save_pretrained(tmp_path / "wcg")
    src = open_audio(str(tmp_path / "wcg"), 64, None)
    assert (src.kind, src.prefix, src.config.num_layers, src.config.downsample_factor) == ("whisper", "model.encoder.", 2, 4)
    assert src.drops and all(n.startswith(("model.decoder.", "proj_out.")) for n in src.drops)
    consumed = {src.prefix + n for b in src.table.bindings() for n in b.source}
    assert set(src.tensors) == consumed | set(src.drops)


# --------------------------------------------------------------------------------------
# Bad inputs: one clear error, nothing written


def _refused(tmp_path: Path, match: str, **kw) -> ConversionError:
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=match) as info:
        omni_from_hf(kw.pop("llm"), str(out), **kw)
    assert "nothing was written" in str(info.value)
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    return info.value


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_wrong_vit_width(parts, tmp_path):
    bad = _copy(parts["vision"], tmp_path / "vit48")
    edit_config(bad, vision_config__embed_dim=48)  # tensors are 32 wide
    err = _refused(tmp_path, "shape mismatches", llm=str(parts["llm"]), vision_dir=str(bad))
    assert "visual.blocks.0.attn.qkv.weight: file has [96, 32], the config implies [144, 48]" in str(err)


def test_missing_visual_tensors(parts, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "no_visual"
    bad.mkdir()
    shutil.copy(parts["vision"] / "config.json", bad / "config.json")
    save_file({k: v for k, v in folder_tensors(parts["vision"]).items() if "visual" not in k},
              str(bad / "model.safetensors"))
    _refused(tmp_path, "no vision tower tensors", llm=str(parts["llm"]), vision_dir=str(bad))


def test_truncated_safetensors(parts, tmp_path):
    bad = _copy(parts["llm"], tmp_path / "llm_cut")
    shard = sorted(bad.glob("*.safetensors"))[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    err = _refused(tmp_path, "truncated|bytes", llm=str(bad), vision_dir=str(parts["vision"]))
    assert shard.name in str(err)


def test_qwen2_5_vl_window_attention_refused(parts, tmp_path):
    bad = _copy(parts["vision"], tmp_path / "qwen25")
    edit_config(bad, model_type="qwen2_5_vl", vision_config__fullatt_block_indexes=[1], vision_config__window_size=112)
    _refused(tmp_path, "Qwen2.5-VL", llm=str(parts["llm"]), vision_dir=str(bad))


def test_bad_layout_and_wrong_audio_folder(parts, tmp_path):
    _refused(tmp_path, "first-stage-num-layers", llm=str(parts["llm"]), tp=1, pp=3, first_stage_num_layers=3)
    _refused(tmp_path, "Whisper folder or a FunASR", llm=str(parts["llm"]), audio_dir=str(parts["vision"]))
