"""The loader on real manifests and media: the demo data set under the pt3 blend, a corrupt file."""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

import pytest

from megatron_omni.data import DEMO_TEXT_TOKENIZER, SentencePieceTokenizer
from megatron_omni.data.blend import load_blend, read_blend_manifests, split_heldout
from megatron_omni.data.blend_loader import build_omni_loader
from megatron_omni.data.modality_stream import LoaderConfig
from megatron_omni.config.encoders import AudioConfig, VisionConfig
from megatron_omni.models.omni_vocab import OmniVocab

REPO = Path(__file__).resolve().parents[2]
S = 1024


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "tools" / "make_demo_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path_factory.mktemp("demo")
    tool.build_demo_data(str(out), seed=0)
    return out


@pytest.fixture(scope="module")
def setup():
    tok = SentencePieceTokenizer(DEMO_TEXT_TOKENIZER)
    return dict(tokenizer=tok, vocab=OmniVocab(tok.vocab_size, audio_codebook_size=256),
                vision=VisionConfig.from_yaml(str(REPO / "configs/model/vision_tiny.yaml")),
                audio=AudioConfig.from_yaml(str(REPO / "configs/model/audio_tiny.yaml")))


def _loader(root, setup, **cfg):
    blend = load_blend(str(REPO / "configs/data/pt3.yaml"))
    config = LoaderConfig(seq_length=S, micro_batch_size=2, lookahead=8, prefetch=2, seed=3, **cfg)
    return blend, build_omni_loader(blend, root=str(root), config=config, **setup)


def test_pt3_blend_streams_every_modality_and_holds_out_the_blend_split(demo, setup):
    blend, loader = _loader(demo, setup)
    with loader:
        assert loader.modalities == blend.modalities
        for m in blend.modalities:
            for _ in range(2):
                mb = loader.next_microbatch(m)
                assert mb.tokens.shape == (2, S) and mb.modality == m and mb.loss_mask.any()
            if m == "image":
                assert mb.pixel_values is not None and mb.image_grid_thw is not None
            if m == "audio":
                assert mb.audio_features is not None and mb.audio_lengths is not None
            if m == "video":
                assert mb.pixel_values_videos is not None
            batches = loader.validation_microbatches(m)
            # every held-out row is in the validation batches: one non-padding segment each
            samples = sum(int(((mb.cu_seqlens[1:] - mb.cu_seqlens[:-1]) > 0).sum()) - _padding_segments(mb)
                          for mb in batches)
            assert samples == blend.validation[m]
        assert loader.skipped_samples == 0 and loader.padding_fraction() < 0.5


def _padding_segments(mb) -> int:
    cu, flat = mb.cu_seqlens.tolist(), mb.loss_mask.view(-1)
    return sum(1 for a, b in zip(cu[:-1], cu[1:]) if not flat[a:b].any())


def test_a_corrupt_image_is_skipped_and_named_once(demo, setup, tmp_path, caplog):
    root = tmp_path / "demo"
    shutil.copytree(demo, root)
    blend = load_blend(str(REPO / "configs/data/pt3.yaml"))
    train = split_heldout(blend, read_blend_manifests(blend, str(root)))["caption"].train
    broken = train[0].media[0]
    with open(root / broken, "r+b") as f:  # keep the header, cut the data
        f.truncate(64)
    _, loader = _loader(root, setup, max_bad_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="megatron_omni.data"), loader:
        for _ in range(12):  # > one pass over the image sources
            assert loader.next_microbatch("image").tokens.shape == (2, S)
        reasons = loader.skipped_by_reason()
    assert reasons == {"image/MediaError": loader.skipped_samples} and loader.skipped_samples >= 1
    lines = [r.getMessage() for r in caplog.records if broken in r.getMessage()]
    assert len(lines) == 1 and train[0].where in lines[0]
