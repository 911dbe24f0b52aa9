"""A stage trains from an `omni-from-hf` import (issue 13), the tiny analogue of M2-omni-9B starting from
Llama-3.1-8B + Qwen2-VL's ViT + an audio encoder: random small HF parts shaped as the tiny configs (Llama
with the demo tokenizer's vocabulary, Qwen2-VL, Whisper) -> omni checkpoint at TP2 -> PT-1
(configs/tiny/stages/pt1.yaml as it is) on the demo data at TP1 x PP2 (another vocabulary padding) with
train.pretrained_checkpoint.  The frozen LLM and encoders come out of training as imported (bit for bit)
and the trained model's text logits are transformers' Llama's; only the connectors moved; the losses are
finite.  tools/forward.py runs a manifest row (image + video + audio, built by the training sample
builder) on that run at TP2 and its logits equal the exported HF folder's (transformers' Llama /
Qwen2-VL vision / Whisper modules) on the same sample."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.convert.convert_helpers import SPECS, hf_logits, make_hf_llama
from tests.convert.omni_export_helpers import hf_inputs, megatron_logits, megatron_model
from tests.convert.omni_helpers import make_hf_qwen2vl, make_hf_whisper
from tests.helpers.launch import REPO, metrics, torchrun, train

transformers = pytest.importorskip("transformers")
TOL = 1e-4
TEXT_VOCAB = 2000  # the demo sentencepiece tokenizer's (megatron_omni/assets/demo_text/tokenizer.model)
CODEBOOK = 256  # configs/model/omni_tiny.yaml
STAGE = "configs/tiny/stages/pt1.yaml"
CONNECTORS = ("vision.merger.", "audio.connector.")
PT1 = ["parallel.pp=2", "train.steps=1", "train.save_interval=1", "train.eval_interval=null", "data.seq_length=256",
       "train.micro_batch_size=1", "train.global_batch_size=2", "optimizer.lr_warmup_steps=0"]
MIXED_ROW = {"id": "mixed-0", "task": "instruct", "modality": "image",
             "media": ["images/caption_000.jpg", "videos/video_000.webm", "audio/beeps_000.opus"],
             "conversations": [
                 {"role": "user", "content": "<image>images/caption_000.jpg</image> then <video>videos/video_000.webm"
                                             "</video> and <audio>audio/beeps_000.opus</audio>: what is there?"},
                 {"role": "assistant", "content": "A picture, a moving shape and beeps."}]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_data):
    from megatron_omni.convert.omni_import import omni_from_hf

    root = tmp_path_factory.mktemp("train_from_import")
    # configs/model/tiny_llm.yaml + omni_tiny.yaml in HF form (the import derives the bundle from these configs)
    llm = make_hf_llama(root / "llm", seed=0, **{**SPECS["gqa"], "vocab_size": TEXT_VOCAB})
    vision = make_hf_qwen2vl(root / "qwen2vl", embed_dim=64)
    whisper = make_hf_whisper(root / "whisper", d_model=64, encoder_ffn_dim=256, max_source_positions=1500)
    imported = root / "omni"
    # padded to a multiple of 512 x TP2 (3072 rows), the run pads to 64 x TP1 (2304): the load takes the rows across
    omni_from_hf(str(llm), str(imported), vision_dir=str(vision), audio_dir=str(whisper), tp=2, pp=1,
                 audio_codebook_size=CODEBOOK, make_vocab_size_divisible_by=512)
    run = root / "pt1"
    proc = train(2, run, [*PT1, f"train.pretrained_checkpoint={imported}", f"data.root={demo_data}",
                          f"train.load={run / 'checkpoints'}"], cache_dir=root / "cache", config=STAGE)
    return {"root": root, "llm": llm, "imported": imported, "run": run, "ckpt": run / "checkpoints",
            "log": proc.stdout + proc.stderr, "demo": demo_data}


def test_pt1_starts_from_the_import_at_another_layout(trained):
    from megatron_omni.convert.mcore_io import CheckpointReader, megatron_world
    from megatron_omni.convert.omni_import import find_omni_config
    from megatron_omni.models.omni_vocab import OmniVocab

    log = trained["log"]
    assert "weights only; layout {'tp': 2, 'pp': 1" in log and "-> {'tp': 1, 'pp': 2" in log, log[-3000:]
    assert "vocabulary padded for another TP size or make_vocab_size_divisible_by" in log
    (row,) = metrics(trained["run"])
    assert set(row["losses"]) == {"image", "audio"}
    assert all(math.isfinite(v) for v in [row["loss"], *row["losses"].values()]), row

    # frozen through PT-1: every LLM / encoder tensor is the import's bit for bit; the connectors trained
    before, after = CheckpointReader(str(trained["imported"])), CheckpointReader(str(trained["ckpt"]))
    assert set(after.model_keys()) == set(before.model_keys())
    rows = OmniVocab(TEXT_VOCAB, CODEBOOK).size
    moved = []
    for key in before.model_keys():
        a, b = before.read({"t": (key, None)})["t"], after.read({"t": (key, None)})["t"]
        if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            assert (a.shape[0], b.shape[0]) == (3072, 2304)
            a, b = a[:rows], b[:rows]
        if not torch.equal(a, b):
            moved.append(key)
    assert moved and all(k.startswith(CONNECTORS) for k in moved), moved
    assert {k.split(".")[0] for k in moved} == {"vision", "audio"}

    # the trained model's text logits are transformers' Llama's (megatron's loader, TP1 x PP2 -> one rank)
    ids = np.random.default_rng(0).integers(0, TEXT_VOCAB, size=(2, 24), dtype=np.int64)
    with megatron_world():
        model = megatron_model(trained["ckpt"], 24)
        got = megatron_logits(model, {"input_ids": torch.from_numpy(ids),
                                      "position_ids": torch.arange(24).expand(3, 2, 24), "pixel_values": None,
                                      "image_grid_thw": None, "pixel_values_videos": None, "video_grid_thw": None,
                                      "audio_features": None, "audio_lengths": None})
    model_cfg, _ = find_omni_config(str(trained["imported"]))
    assert model_cfg.vocab_size == TEXT_VOCAB and got.shape == (2, 24, rows)
    delta = float(np.abs(got[..., :TEXT_VOCAB].numpy() - hf_logits(trained["llm"], ids)).max())
    print(f"\nafter PT-1 from the import: megatron text logits vs transformers Llama max|d| {delta:.2e}")
    assert delta <= TOL


def test_forward_tool_on_a_manifest_row_equals_the_exported_folder(trained, tmp_path):
    from megatron_omni.config.schema import DataConfig
    from megatron_omni.convert import mcore_to_hf
    from megatron_omni.convert.omni_export import omni_configs
    from megatron_omni.data.forward_batches import manifest_microbatch
    from megatron_omni.data.tokenizer import build_tokenizer
    from megatron_omni.models.omni import omni_vocab

    manifest = tmp_path / "mixed.jsonl"
    manifest.write_text("\n" + json.dumps(MIXED_ROW) + "\n")  # the sample is on line 2
    out = tmp_path / "logits.npy"
    torchrun(2, [str(REPO / "tools" / "forward.py"), "--load", str(trained["ckpt"]), "--manifest", str(manifest),
                 "--line", "2", "--data-root", str(trained["demo"]), "--output", str(out), "parallel.tp=2"])
    got = torch.from_numpy(np.load(out))

    model_cfg, omni, _ = omni_configs(str(trained["ckpt"]))
    tokenizer = build_tokenizer(DataConfig(tokenizer_model=str(REPO / "megatron_omni" / "assets" / "demo_text" /
                                                               "tokenizer.model")))
    mb = manifest_microbatch(str(manifest), 2, root=str(trained["demo"]), tokenizer=tokenizer,
                             vocab=omni_vocab(model_cfg, omni), vision=omni.vision, audio=omni.audio,
                             max_image_tokens=320, max_video_frames=16)
    assert all(x is not None for x in (mb.pixel_values, mb.pixel_values_videos, mb.audio_features))
    mcore_to_hf(str(trained["ckpt"]), str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True,
                                                            dtype=torch.float32).eval()
    sample = {"input_ids": mb.tokens, **{k: getattr(mb, k) for k in (
        "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "audio_features", "audio_lengths")}}
    with torch.no_grad():
        ref = hf(**hf_inputs(sample)).logits
    assert got.shape == ref.shape == (1, mb.tokens.shape[1], omni_vocab(model_cfg, omni).size)
    delta = (got - ref).abs().max().item()
    print(f"\nforward.py --manifest (TP2) vs exported HF folder on image+video+audio+text ({mb.tokens.shape[1]} "
          f"tokens): max|d| {delta:.2e} (logit scale {ref.abs().max():.2f})")
    assert delta <= TOL


def test_a_run_config_for_another_architecture_is_refused(trained):
    """What shapes cannot show (RoPE base, activation) and what they can (encoder width) against the import:
    one error naming every differing field as the override that fixes it; the stage config as it is passes."""
    from megatron_omni.config.loader import ConfigError, load_config
    from megatron_omni.training.pretrained_config import check_converted_architecture

    imported = trained["imported"]
    check_converted_architecture(load_config(STAGE), str(imported / "iter_0000000"))
    wrong = load_config(STAGE, ["model.rotary_base=10000", "omni.vision.activation=gelu", "omni.audio.d_model=32",
                                "model.transformer_impl=local", "omni.freeze=[]"])  # the last two may differ
    with pytest.raises(ConfigError, match="converted for another architecture") as info:
        check_converted_architecture(wrong, str(imported))
    msg = str(info.value)
    for fix in ("model.rotary_base=500000.0 (run: 10000.0)", 'omni.vision.activation="quick_gelu" (run: "gelu")',
                "omni.audio.d_model=64 (run: 32)"):
        assert fix in msg, msg
    assert "transformer_impl" not in msg and "freeze=" not in msg.split("(then")[0]
    assert f"model={imported}/llm.yaml omni={imported}/omni.yaml" in msg


# The published configs of the paper's parts (Sec. 2.1, Table 1): meta-llama/Llama-3.1-8B and Llama-3.3-70B
# config.json, Qwen/Qwen2-VL-7B-Instruct's vision_config, paraformer-zh's config.yaml (encoder / frontend).
LLAMA_3 = dict(architectures=["LlamaForCausalLM"], hidden_act="silu", vocab_size=128256, rms_norm_eps=1e-5,
               max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False,
               attention_bias=False, mlp_bias=False, initializer_range=0.02,
               rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"})
LLAMA = {"9b": dict(LLAMA_3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8),
         "72b": dict(LLAMA_3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                     num_attention_heads=64, num_key_value_heads=8)}
QWEN2_VL_7B_VISION = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, in_chans=3, hidden_size=3584,
                          patch_size=14, spatial_merge_size=2, spatial_patch_size=14, temporal_patch_size=2)
PARAFORMER_ZH = {"encoder": "SANMEncoder",
                 "encoder_conf": dict(output_size=512, attention_heads=4, linear_units=2048, num_blocks=50,
                                      dropout_rate=0.1, positional_dropout_rate=0.1, attention_dropout_rate=0.1,
                                      input_layer="pe", pos_enc_class="SinusoidalPositionEncoder",
                                      normalize_before=True, kernel_size=11, sanm_shfit=0,
                                      selfattention_layer_type="sanm"),
                 "frontend": "WavFrontend",
                 "frontend_conf": dict(fs=16000, window="hamming", n_mels=80, frame_length=25, frame_shift=10,
                                       lfr_m=7, lfr_n=6)}


@pytest.mark.parametrize("size", ["9b", "72b"])
def test_m2omni_stage_configs_are_the_import_of_the_papers_parts(size):
    """What omni-from-hf derives from Llama-3.x + Qwen2-VL-7B's ViT + paraformer-zh is the architecture of
    configs/m2omni_<size>/stages/: PT-1 starts from that import with no model / omni override."""
    from megatron_omni.config.loader import load_config
    from megatron_omni.config.schema import OmniConfig
    from megatron_omni.convert.llama import config_from_hf
    from megatron_omni.convert.omni_import import mrope_section
    from megatron_omni.convert.omni_sources import sanm_config_from_funasr, vision_config_from_hf
    from megatron_omni.training.pretrained_config import architecture_differences

    model = config_from_hf(LLAMA[size])
    problems = []
    vision, merger_width = vision_config_from_hf(QWEN2_VL_7B_VISION, model.hidden_size, problems)
    audio = sanm_config_from_funasr(PARAFORMER_ZH, model.hidden_size, 3, problems)  # omni-from-hf's default 3
    assert not problems and merger_width == 3584  # != the LLM width: the merger's last projection is re-initialised
    omni = OmniConfig(vision=vision, audio=audio, audio_codebook_size=4096, mrope_section=mrope_section(model.head_dim))
    run = load_config(f"configs/m2omni_{size}/stages/pt1.yaml")
    assert architecture_differences(run.model, run.omni, model, omni) == []
