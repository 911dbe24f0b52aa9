"""The exported omni folder's processor (AutoProcessor, trust_remote_code) against megatron-omni's own data path:
on a conversation with an image, a video, two audio clips and text, `apply_chat_template` + `__call__` give
exactly the tensors `build_sample` gives for the same manifest row (token ids with the placeholder spans,
pixel values + grids, fbank features + lengths; the model's M-RoPE ids on them equal the sample's), so the
exported model's logits on the two are the same; its restated media rules equal the project's; bad input is
one clear error.  The sample builder decodes with its reference backends (PIL, PyAV): the processor starts
from decoded pixels / waveforms, and DALI's resize is not PIL's bicubic."""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

# Small limits, so the image and the video frames are resized (and the video's per-group budget is cut).
LIMITS = {"max_image_tokens": 8, "max_video_frames": 4}
USER = "<image>img.png</image>\nWhat is shown here? <video>clip.mkv</video> and then <audio>a.wav</audio>,  <audio>b.wav</audio> too."
ANSWER = "A <gen_image>smooth gradient</gen_image> with a chirp."


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A manifest row (image + video + two audio clips), written as files."""
    from megatron_omni.data.manifest import read_manifest
    from megatron_omni.data.media.synth import chirp, smooth_clip, smooth_rgb, write_audio, write_image, write_video

    root = tmp_path_factory.mktemp("processor_media")
    write_image(root / "img.png", smooth_rgb(50, 90))  # -> 56 x 84: 6 tokens
    write_video(root / "clip.mkv", smooth_clip(5, 40, 60), fps=4.0, codec="mjpeg")  # 4 frames, 2 x 56 x 56
    write_audio(root / "a.wav", chirp(0.45, 16000), 16000)  # 43 fbank frames: 6 tokens
    write_audio(root / "b.wav", chirp(0.3, 16000, f0=500.0), 16000)  # 28 frames: 4 tokens
    row = {"id": "p0", "task": "instruct", "modality": "video", "media": ["img.png", "clip.mkv", "a.wav", "b.wav"],
           "conversations": [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}]}
    (root / "rows.jsonl").write_text(json.dumps(row) + "\n")
    (row,) = read_manifest(str(root / "rows.jsonl"))
    return root, row


@pytest.fixture(scope="module")
def built(exported, media):
    """build_sample on the row (reference decoders), and the processor on the same media, decoded."""
    from PIL import Image

    from megatron_omni.data.chat_template import ChatTemplate
    from megatron_omni.data.media import load_waveform
    from megatron_omni.data.media.pyav_decode import decode_video_frames, probe_video
    from megatron_omni.data.sample_builder import build_sample
    from megatron_omni.data.tokenizer import SentencePieceTokenizer

    root, row = media
    omni, vocab = exported["omni"], exported["ref"]["vocab"]
    tokenizer = SentencePieceTokenizer(exported["reports"]["omni"]["tokenizer"]["source"])  # the run's tokenizer
    with pytest.MonkeyPatch.context() as mp:
        for kind, name in (("IMAGE", "pil"), ("VIDEO", "pyav"), ("AUDIO", "pyav")):
            mp.setenv(f"MEGATRON_OMNI_{kind}_BACKEND", name)
        sample = build_sample(row, root=str(root), tokenizer=tokenizer, vocab=vocab, vision=omni.vision,
                              audio=omni.audio, template=ChatTemplate(tokenizer, vocab), **LIMITS)
        data = (root / "clip.mkv").read_bytes()
        frames = decode_video_frames(data, list(range(probe_video(data).num_frames)))
        waves = [load_waveform(str(root / n)).numpy() for n in ("a.wav", "b.wav")]
    processor = transformers.AutoProcessor.from_pretrained(exported["root"] / "hf", trust_remote_code=True)
    messages = [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}]
    inputs = processor(text=processor.apply_chat_template(messages), images=[Image.open(root / "img.png")],
                       videos=[frames], audio=waves, sampling_rate=16000, **LIMITS)
    return sample, inputs, processor


def test_processor_output_equals_the_sample_builder(built, hf_model):
    sample, inputs, _ = built
    model, _ = hf_model
    assert type(built[2]).__name__ == "MegatronOmniProcessor"
    assert inputs["input_ids"][0].tolist() == sample.tokens.tolist()
    assert inputs["attention_mask"].all()
    for ours, theirs in (("pixel_values", "pixel_values"), ("image_grid_thw", "image_grid_thw"),
                         ("pixel_values_videos", "pixel_values_videos"), ("video_grid_thw", "video_grid_thw"),
                         ("audio_feature_lengths", "audio_lengths")):
        assert torch.equal(inputs[ours], getattr(sample, theirs)), ours
    assert torch.equal(inputs["input_features"], sample.audio_features.transpose(1, 2))
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6]] and inputs["video_grid_thw"].tolist() == [[2, 4, 4]]
    assert inputs["audio_feature_lengths"].tolist() == [43, 28]  # a padded batch of two clips
    positions, _ = model.get_rope_index(inputs["input_ids"], inputs["image_grid_thw"], inputs["video_grid_thw"],
                                        inputs["attention_mask"])
    assert torch.equal(positions[:, 0], sample.position_ids)


def test_model_logits_on_processor_output_equal_those_on_the_sample(built, hf_model):
    sample, inputs, _ = built
    model, _ = hf_model
    from_sample = {"input_ids": sample.tokens[None], "pixel_values": sample.pixel_values,
                   "image_grid_thw": sample.image_grid_thw, "pixel_values_videos": sample.pixel_values_videos,
                   "video_grid_thw": sample.video_grid_thw, "input_features": sample.audio_features.transpose(1, 2),
                   "audio_feature_lengths": sample.audio_lengths}
    with torch.no_grad():
        got = model(**inputs).logits
        ref = model(**from_sample).logits
    assert got.shape == ref.shape == (1, sample.tokens.numel(), model.config.text_config.vocab_size)
    print(f"\nprocessor vs sample builder: max|d| logits {(got - ref).abs().max().item():.1e} "
          f"over {sample.tokens.numel()} tokens")
    assert torch.equal(got, ref)


def test_chat_template_forms_agree_and_text_pieces_keep_sentencepiece_spacing(built):
    sample, inputs, processor = built
    parts = [{"type": "image"}, {"type": "text", "text": "\nWhat is shown here? "}, {"type": "video"},
             {"type": "text", "text": " and then "}, {"type": "audio"}, {"type": "text", "text": ",  "},
             {"type": "audio"}, {"type": "text", "text": " too."}]
    as_parts = processor.apply_chat_template([{"role": "user", "content": parts},
                                              {"role": "assistant", "content": ANSWER}])
    stripped = USER
    for name in ("img.png", "clip.mkv", "a.wav", "b.wav"):
        stripped = stripped.replace(name, "")
    assert as_parts == processor.apply_chat_template([{"role": "user", "content": stripped},
                                                      {"role": "assistant", "content": ANSWER}])
    prompt = processor.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_bad_input_is_one_clear_error(built):
    _, _, processor = built
    image = np.zeros((30, 30, 3), dtype=np.uint8)
    cases = [
        (dict(text="<image></image> two images?", images=[image, image]), "references 1 image(s)"),
        (dict(text="<image></image><audio></audio>", images=[image]), "references 1 audio(s)"),
        (dict(text="an <image_pad> by hand", images=[]), "outside a <kind>...</kind> reference"),
        (dict(text="<audio></audio>", audio=[np.zeros(8000, np.float32)], sampling_rate=8000), "resample first"),
        (dict(text="<audio></audio>", audio=[np.zeros(100, np.float32)]), "too short"),
        (dict(text="<image></image>", images=[np.zeros((30, 30), np.float32)]), "[H, W, 3] uint8"),
    ]
    for kwargs, words in cases:
        with pytest.raises(ValueError, match=re.escape(words)):
            processor(**kwargs)


def test_restated_media_rules_equal_the_projects():
    """The processing file's copies of geometry / fbank / token-count rules against megatron-omni's own."""
    from megatron_omni.data.media.fbank import kaldi_fbank
    from megatron_omni.data.media.geometry import image_grid, plan_video
    from megatron_omni.hf import processing_megatron_omni as hf
    from megatron_omni.config.encoders import AudioConfig, VisionConfig, audio_token_count

    vision = VisionConfig(depth=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64, out_hidden_size=32)
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(x) for x in rng.integers(1, 2000, 2))
        budget, floor = int(rng.integers(1, 3000)), int(rng.integers(0, 8))
        assert hf.image_grid(h, w, 28, budget, floor) == image_grid(h, w, vision=vision, max_tokens=budget,
                                                                    min_tokens=floor), (h, w, budget, floor)
        total, frames, tokens = int(rng.integers(1, 300)), int(rng.integers(2, 64)), int(rng.integers(4, 5000))
        assert hf.uniform_frame_indices(total, frames, tokens, 2) == plan_video(
            total, 25.0, h, w, vision=vision, max_frames=frames, max_tokens=tokens).frame_indices
    for encoder in ("whisper", "sanm"):
        cfg = AudioConfig(encoder_type=encoder, d_model=32, num_layers=1, num_attention_heads=2, ffn_hidden_size=64,
                          out_hidden_size=32, downsample_factor=3)
        a = {"encoder_type": encoder, "conv2_stride": cfg.conv2_stride, "lfr_n": cfg.lfr_n, "downsample_factor": 3}
        assert [hf.audio_token_count(n, a) for n in range(1, 200)] == [audio_token_count(n, cfg) for n in range(1, 200)]
    a = {"sampling_rate": 16000, "frame_length_ms": 25.0, "frame_shift_ms": 10.0, "wave_scale": 32768.0,
         "num_mel_bins": 80}
    wave = torch.from_numpy(rng.uniform(-0.5, 0.5, 5000).astype(np.float32))
    assert torch.equal(hf.kaldi_fbank(wave, a), kaldi_fbank(wave * 32768.0, num_mel_bins=80))


def test_processing_file_imports_no_megatron_omni():
    """It runs from the exported folder: only the standard library, numpy, torch, PIL and transformers."""
    from megatron_omni.hf import HF_DIR

    tree = ast.parse((Path(HF_DIR) / "processing_megatron_omni.py").read_text())
    roots = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
             for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
             for a in (n.names if isinstance(n, ast.Import) else [n])}
    assert roots - set(sys.stdlib_module_names) <= {"numpy", "torch", "PIL", "transformers", "__future__"}, roots
