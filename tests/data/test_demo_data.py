"""Demo data set: builds in tmp, validates, every sample builds, deterministic; placeholders = encoder tokens."""

from __future__ import annotations

import glob
import importlib.util
from collections import Counter
from pathlib import Path

import pytest
import torch

from megatron_omni.data import DEMO_TEXT_TOKENIZER
from megatron_omni.data.blend import load_blend, read_blend_manifests, split_heldout
from megatron_omni.data.chat_template import ChatTemplate
from megatron_omni.data.manifest import check_media, read_manifest
from megatron_omni.data.sample_builder import build_preference_pair, build_sample
from megatron_omni.data.tokenizer import SentencePieceTokenizer
from megatron_omni.config.encoders import AudioConfig, VisionConfig, audio_token_count
from megatron_omni.models.omni_vocab import OmniVocab
from megatron_omni.models.vision.encoder import merged_token_counts

REPO = Path(__file__).resolve().parents[2]
STAGES = ("pt1", "pt2", "pt3", "it1", "it2", "it3", "gspo", "at")
VERIFIABLE_SOURCES = {"rlqa_image": 8, "rlqa_video": 6, "rlqa_audio": 8, "rlqa_text": 16}
EXPECTED_SOURCES = {"caption": 24, "ocr": 12, "interleaved": 6, "text": 24, "instruct": 16, "video_qa": 8,
                    "audio_caption": 12, "audio_qa": 8, "gen_image": 12, "speech_gen": 8, "dpo": 8,
                    **VERIFIABLE_SOURCES}
EXPECTED_TASKS = {**{k: v for k, v in EXPECTED_SOURCES.items() if k not in VERIFIABLE_SOURCES},
                  "verifiable_qa": sum(VERIFIABLE_SOURCES.values())}


def _tool():
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "tools" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    counts = _tool().build_demo_data(str(out), seed=0)
    return out, counts


@pytest.fixture(scope="module")
def setup():
    tok = SentencePieceTokenizer(DEMO_TEXT_TOKENIZER)
    vocab = OmniVocab(tok.vocab_size, audio_codebook_size=256)
    vision = VisionConfig.from_yaml(str(REPO / "configs/model/vision_tiny.yaml"))
    audio = AudioConfig.from_yaml(str(REPO / "configs/model/audio_tiny.yaml"))
    return dict(tokenizer=tok, vocab=vocab, vision=vision, audio=audio, template=ChatTemplate(tok, vocab))


@pytest.fixture(scope="module")
def built(demo, setup):
    """Every row of every manifest built once (it3 limits: 2560 image tokens, video capped at 16 frames)."""
    root, _ = demo
    samples = []
    for path in sorted(glob.glob(str(root / "manifests" / "*.jsonl"))):
        for row in read_manifest(path):
            kw = dict(root=str(root), max_image_tokens=320, max_video_frames=16, **setup)
            if row.task == "dpo":
                samples.append((row, build_preference_pair(row, **kw)))
            else:
                samples.append((row, (build_sample(row, **kw),)))
    return samples


def test_builds_small_and_validates(demo):
    root, counts = demo
    assert counts == EXPECTED_SOURCES
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size < 5e6, f"demo set is {size / 1e6:.1f} MB"
    tasks = Counter()
    for path in glob.glob(str(root / "manifests" / "*.jsonl")):
        rows = read_manifest(path)
        assert check_media(rows, str(root)).missing == []
        tasks.update(r.task for r in rows)
    assert dict(tasks) == EXPECTED_TASKS
    codecs = {p.suffix for p in root.rglob("*") if p.suffix in (".webm", ".mp4", ".opus", ".wav", ".jpg", ".png")}
    assert codecs == {".webm", ".mp4", ".opus", ".wav", ".jpg", ".png"}


@pytest.mark.parametrize("stage", STAGES)
def test_stage_blends_resolve_against_demo_root(demo, stage):
    root, _ = demo
    blend = load_blend(str(REPO / "configs" / "data" / f"{stage}.yaml"))
    rows = read_blend_manifests(blend, str(root))
    split = split_heldout(blend, rows)
    held = Counter()
    for s in blend.sources:
        held[s.modality] += len(split[s.name].valid)
        assert {r.id for r in split[s.name].train}.isdisjoint(r.id for r in split[s.name].valid)
    assert dict(held) == {m: n for m, n in blend.validation.items() if n}


def test_sample_positions_equal_hf_qwen2_vl_rope_index(built, setup):
    """The M-RoPE positions the trainer gets (sample_builder, per sample) == transformers' Qwen2-VL
    `get_rope_index` on the same tokens and grids, image / video tokens typed as such and the audio
    placeholders as text (M2-omni gives audio 1D positions)."""
    qwen2_vl = pytest.importorskip("transformers.models.qwen2_vl.modeling_qwen2_vl")
    from types import SimpleNamespace

    vocab, merge = setup["vocab"], setup["vision"].spatial_merge_size

    class HFModel:  # what get_rope_index reads of the model
        get_vision_position_ids = qwen2_vl.Qwen2VLModel.get_vision_position_ids
        config = SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=merge, tokens_per_second=None))

    checked = 0
    for _, samples in built:
        for s in samples:
            if s.image_grid_thw is None and s.video_grid_thw is None:
                continue  # HF's vision-free branch is the plain 1D arange: checked in test_every_sample_builds
            ids = s.tokens[None]
            types = (ids == vocab.image_pad_id).int() + 2 * (ids == vocab.video_pad_id).int()
            ref, _ = qwen2_vl.Qwen2VLModel.get_rope_index(HFModel(), ids, types, s.image_grid_thw, s.video_grid_thw)
            assert torch.equal(s.position_ids, ref[:, 0]), s.sample_id
            checked += 1
    assert checked >= 20  # images, videos, interleaved, image + audio rows of the demo set


def test_every_sample_builds(built, setup):
    vocab, vision, audio = setup["vocab"], setup["vision"], setup["audio"]
    per_task = Counter()
    for row, samples in built:
        per_task[row.task] += 1
        for s in samples:
            n = len(s)
            assert s.tokens.shape == s.labels.shape == s.loss_mask.shape == (n,) and s.position_ids.shape == (3, n)
            assert torch.equal(s.labels[:-1], s.tokens[1:]) and s.loss_mask[-1] == 0
            assert s.modality == row.modality and row.id in s.sample_id
            assert s.loss_mask.sum() > 0, row.where
            assert s.position_ids[:, 0].tolist() == [0, 0, 0]
            if s.image_grid_thw is None and s.video_grid_thw is None:  # text and audio pads: 1D positions
                assert torch.equal(s.position_ids, torch.arange(n).expand(3, n))
            # Placeholders = the model's own token counts for what the loaders returned.
            n_img = int(merged_token_counts(s.image_grid_thw, vision.spatial_merge_size).sum()) if (
                s.image_grid_thw is not None) else 0
            n_vid = int(merged_token_counts(s.video_grid_thw, vision.spatial_merge_size).sum()) if (
                s.video_grid_thw is not None) else 0
            n_aud = int(audio_token_count(s.audio_lengths, audio).sum()) if s.audio_lengths is not None else 0
            assert int((s.tokens == vocab.image_pad_id).sum()) == n_img
            assert int((s.tokens == vocab.video_pad_id).sum()) == n_vid
            assert int((s.tokens == vocab.audio_pad_id).sum()) == n_aud
            if s.pixel_values is not None:
                assert s.pixel_values.shape == (int(s.image_grid_thw.prod(-1).sum()), vision.patch_dim)
            if s.video_grid_thw is not None:
                assert int(s.video_grid_thw[0, 0]) * vision.temporal_patch_size <= 16
            # No media or prompt token is ever a target.
            targets = s.labels[s.loss_mask.bool()]
            for name in ("<image_pad>", "<video_pad>", "<audio_pad>", "<|start_header_id|>", "<image>", "<audio>"):
                assert not bool((targets == vocab.id(name)).any()), (row.where, name)
            if row.task == "speech_gen":
                assert int(vocab.is_audio_generation_target(targets).sum()) == len(row.conversations[-1].audio_codes) + 1
            if row.task == "gen_image":
                assert int((targets == vocab.id("<gen_image>")).sum()) == 1
    assert dict(per_task) == EXPECTED_TASKS


def test_preference_pair_shares_the_prompt(built):
    for row, (chosen, rejected) in [(r, s) for r, s in built if r.task == "dpo"]:
        first_target = int(chosen.loss_mask.nonzero()[0])
        assert first_target == int(rejected.loss_mask.nonzero()[0])
        assert torch.equal(chosen.tokens[: first_target + 1], rejected.tokens[: first_target + 1])
        assert not torch.equal(chosen.tokens, rejected.tokens)
        assert torch.equal(chosen.image_grid_thw, rejected.image_grid_thw)


def test_placeholders_equal_encoder_outputs(built, setup):
    """Run the tiny NaViT and Whisper-style encoders on built samples: one output per placeholder."""
    from megatron_omni.convert.mcore_io import megatron_world
    from megatron_omni.models.audio.whisper import WhisperStyleEncoder
    from megatron_omni.models.vision.encoder import NaViTEncoder

    vocab = setup["vocab"]
    image = next(s for r, (s, *_) in built if r.task == "interleaved")
    video = next(s for r, (s, *_) in built if r.task == "video_qa")
    clip = next(s for r, (s, *_) in built if r.task == "audio_caption")
    with megatron_world(), torch.no_grad():
        navit = NaViTEncoder(setup["vision"]).eval()
        assert navit(image.pixel_values, image.image_grid_thw).shape[0] == int((image.tokens == vocab.image_pad_id).sum())
        assert navit(video.pixel_values_videos, video.video_grid_thw).shape[0] == int(
            (video.tokens == vocab.video_pad_id).sum())
        whisper = WhisperStyleEncoder(setup["audio"]).eval()
        # OmniSample carries [n, T, F]; the encoder takes [n, F, T] (Whisper layout).
        tokens, lengths = whisper(clip.audio_features.transpose(1, 2), clip.audio_lengths)
        assert tokens.shape[0] == int(lengths.sum())
        assert int(lengths.sum()) == int((clip.tokens == vocab.audio_pad_id).sum()) > 0


def test_deterministic(demo, tmp_path):
    """Two builds give byte-identical files (H.264 excluded: libx264 is not bit-reproducible)."""
    tool = _tool()
    root, _ = demo
    tool.build_demo_data(str(tmp_path), seed=0)
    first, second = tool.tree_digest(str(root), (".mp4",)), tool.tree_digest(str(tmp_path), (".mp4",))
    assert first == second and len(first) > 80
    assert sorted(p.name for p in root.rglob("*.mp4")) == sorted(p.name for p in tmp_path.rglob("*.mp4"))
    tool.build_demo_data(str(tmp_path), seed=1)
    changed = tool.tree_digest(str(tmp_path), (".mp4",))
    assert changed.keys() == first.keys() and changed != first


def test_verifiable_answers_earn_their_rewards(demo):
    """Every GSPO row is checkable by its source's rules: its own reference answer earns the full
    reward (sum of the weights), an answer that is wrong, or right but unformatted, earns less."""
    from megatron_omni.rl.rewards import RewardTarget, combined_reward

    root, _ = demo
    blend = load_blend(str(REPO / "configs" / "data" / "gspo.yaml"))
    rows = read_blend_manifests(blend, str(root))
    answers = Counter()
    for s in blend.sources:
        assert s.rewards and len(rows[s.name]) == VERIFIABLE_SOURCES[s.name]
        full = sum(s.rewards.values())
        for row in rows[s.name]:
            target = RewardTarget.from_row(row.metadata, row.where)
            reference = row.conversations[-1].content
            assert combined_reward(reference, target, s.rewards) == pytest.approx(full), row.where
            assert combined_reward(f"Answer: x{target.answer}x", target, s.rewards) < full, row.where
            assert combined_reward(target.answer, target, s.rewards) == pytest.approx(full - s.rewards["format"])
            answers[s.name, target.answer] += 1
    # not one constant answer per source: a policy must look at the input to earn the reward
    assert all(sum(1 for (src, _) in answers if src == name) > 1 for name in VERIFIABLE_SOURCES)

