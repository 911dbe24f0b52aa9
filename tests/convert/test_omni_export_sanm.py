"""Omni export with the SAN-M (Paraformer) audio encoder: the folder's plain-torch FunASR SANMEncoder (FunASR
names, LFR + CMVN front end) loads with no missing keys, its encoder tensors are ours bit for bit, and the
mixed image + video + audio + text logits equal the megatron model's (one process: the model is saved with
megatron's dist_checkpointing.save and exported from that checkpoint)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from megatron_omni.config import ParallelConfig
from megatron_omni.config.typed import load_section_file
from megatron_omni.config.schema import ModelConfig, OmniConfig
from megatron_omni.config.encoders import AudioConfig
from tests.convert.omni_export_helpers import hf_inputs, megatron_logits, mixed_sample

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[2]
SANM = AudioConfig(encoder_type="sanm", num_mel_bins=80, d_model=64, num_layers=3, num_attention_heads=4,
                   ffn_hidden_size=128, lfr_m=7, lfr_n=6, sanm_kernel_size=11, layernorm_epsilon=1e-12,
                   downsample_factor=2, out_hidden_size=64)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from megatron.core import dist_checkpointing

    from megatron_omni.convert import mcore_to_hf
    from megatron_omni.convert.mcore_io import megatron_world
    from megatron_omni.models.omni import build_omni_chunks, init_omni_weights_layout_invariant

    root = tmp_path_factory.mktemp("omni_sanm")
    llm = load_section_file(ModelConfig, str(REPO / "configs/model/tiny_llm.yaml"))
    omni = dataclasses.replace(load_section_file(OmniConfig, str(REPO / "configs/model/omni_tiny.yaml")), audio=SANM)
    ckpt = root / "ckpt"
    with megatron_world():
        (model,) = build_omni_chunks(llm, ParallelConfig(), omni, seq_length=64, params_dtype=torch.float32)
        init_omni_weights_layout_invariant([model], llm, omni, seed=3)
        with torch.no_grad():  # every tensor off its init (norms, biases, CMVN), so every name map is exercised
            g = torch.Generator().manual_seed(0)
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.eval()
        (ckpt / "iter_0000001").mkdir(parents=True)
        dist_checkpointing.save({"model": model.sharded_state_dict()}, str(ckpt / "iter_0000001"))
        (ckpt / "latest_checkpointed_iteration.txt").write_text("1")
        (ckpt / "model.yaml").write_text(yaml.safe_dump({"model": dataclasses.asdict(llm),
                                                          "omni": dataclasses.asdict(omni)}))
        sample = mixed_sample(llm, omni)
        ref = {"logits": megatron_logits(model, sample),
               "audio": {k: v.clone() for k, v in model.audio.state_dict().items() if isinstance(v, torch.Tensor)}}
    report = mcore_to_hf(str(ckpt), str(root / "hf"))
    return {"root": root, "sample": sample, "ref": ref, "omni": omni, "report": report}


def test_sanm_folder_loads_and_logits_equal_megatron(exported):
    from megatron_omni.convert.omni_mapping import funasr_sanm_table

    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        exported["root"] / "hf", trust_remote_code=True, dtype=torch.float32, output_loading_info=True)
    model.eval()
    assert {k: v for k, v in info.items() if v} == {}, info
    assert type(model.audio_tower).__name__ == "SANMEncoder"
    # encoder tensors: FunASR names in the folder, ours bit for bit
    hf_audio = model.audio_tower.state_dict()
    ours = exported["ref"]["audio"]
    table = funasr_sanm_table(exported["omni"].audio)
    for b in table.bindings():
        (src,) = b.source
        assert torch.equal(hf_audio[src], ours[b.key[len("audio."):]]), src
    for name in ("shift", "scale"):
        assert torch.equal(hf_audio[f"cmvn.{name}"], ours[f"cmvn.{name}"])
    assert len(hf_audio) == len(table.bindings()) + 2
    with torch.no_grad():
        got = model(**hf_inputs(exported["sample"])).logits
    ref = exported["ref"]["logits"]
    delta = (got - ref).abs().max().item()
    print(f"\nSAN-M omni folder: max|d| HF vs megatron {delta:.2e} (logit scale {ref.abs().max():.2f})")
    assert delta <= 1e-4
