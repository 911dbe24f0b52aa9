"""OmniModel (1 process): packed forward == per-sample forwards, M-RoPE on text == the bare Llama
GPTModel's 1D RoPE, placeholder/encoder count checks, the L_un / L_gen_a split, module freezing."""

from pathlib import Path

import pytest
import torch

from megatron_omni.config import ParallelConfig
from megatron_omni.config.loader import load_section_file
from megatron_omni.config.schema import ModelConfig, OmniConfig
from megatron_omni.data.mock_omni import MockOmniData
from megatron_omni.data.omni_batch import OmniMicrobatch
from megatron_omni.models.omni import (
    apply_freeze,
    build_omni_chunks,
    init_omni_weights_layout_invariant,
    module_of,
)
from megatron_omni.training.omni_step import AUDIO_GEN_LOSS, UNDERSTANDING_LOSS, omni_loss

REPO = Path(__file__).resolve().parents[2]
SEQ = 96


@pytest.fixture(scope="module")
def world():
    from megatron_omni.convert.mcore_io import megatron_world

    with megatron_world():
        llm = load_section_file(ModelConfig, str(REPO / "configs/model/tiny_llm.yaml"))
        omni = load_section_file(OmniConfig, str(REPO / "configs/model/omni_tiny.yaml"))
        (model,) = build_omni_chunks(llm, ParallelConfig(), omni, seq_length=SEQ, params_dtype=torch.float32)
        init_omni_weights_layout_invariant([model], llm, omni, seed=7)
        model.eval()
        data = MockOmniData(omni, model.vocab, seq_length=SEQ, micro_batch_size=1, seed=3)
        yield llm, omni, model, data


def _forward(model, batch: OmniMicrobatch) -> torch.Tensor:
    B, S = batch.tokens.shape
    mask, packed = model.packed_row_attention(batch.cu_seqlens, B, S)  # THD (auto -> torch here) or dense mask
    return model(batch.tokens, batch.position_ids, mask, packed_seq_params=packed, labels=batch.labels,
                 pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                 pixel_values_videos=batch.pixel_values_videos, video_grid_thw=batch.video_grid_thw,
                 audio_features=batch.audio_features, audio_lengths=batch.audio_lengths)


def _split_samples(batch: OmniMicrobatch, vocab, audio_cfg):
    """The packed row's samples as stand-alone one-row microbatches, each with its own media."""
    from megatron_omni.config.encoders import audio_token_count

    cu = batch.cu_seqlens.tolist()
    grids = {"image": list(batch.image_grid_thw) if batch.image_grid_thw is not None else [],
             "video": list(batch.video_grid_thw) if batch.video_grid_thw is not None else []}
    pixels = {"image": batch.pixel_values, "video": batch.pixel_values_videos}
    offsets = {"image": 0, "video": 0}
    audio_i = 0
    for start, end in zip(cu[:-1], cu[1:]):
        ids = batch.tokens.view(-1)[start:end]
        kw = {}
        for kind, open_tok in (("image", "<image>"), ("video", "<video>")):
            n = int((ids == vocab.id(open_tok)).sum())
            if n:
                g = torch.stack(grids[kind][:n])
                grids[kind] = grids[kind][n:]
                rows = int(g.prod(-1).sum())
                pv = pixels[kind][offsets[kind]:offsets[kind] + rows]
                offsets[kind] += rows
                kw.update({"pixel_values": pv, "image_grid_thw": g} if kind == "image"
                          else {"pixel_values_videos": pv, "video_grid_thw": g})
        n_audio = int((ids == vocab.id("<audio>")).sum())
        if n_audio:
            lengths = batch.audio_lengths[audio_i:audio_i + n_audio]
            assert int(audio_token_count(lengths, audio_cfg).sum()) == int((ids == vocab.audio_pad_id).sum())
            kw.update(audio_features=batch.audio_features[audio_i:audio_i + n_audio, :int(lengths.max())],
                      audio_lengths=lengths)
            audio_i += n_audio
        L = end - start
        yield start, end, OmniMicrobatch(
            tokens=ids[None], labels=batch.labels.view(-1)[start:end][None],
            loss_mask=batch.loss_mask.view(-1)[start:end][None],
            position_ids=batch.position_ids.reshape(3, -1)[:, start:end][:, None],
            cu_seqlens=torch.tensor([0, L], dtype=torch.int32), modality=batch.modality, **kw)


@pytest.mark.parametrize("modality", ["image", "video", "audio", "audio_gen", "text"])
def test_packed_forward_equals_per_sample_forwards(world, modality):
    _, omni, model, data = world
    batch = data.next_microbatch(modality)
    assert batch.cu_seqlens.numel() > 2, "the mock row should hold several samples"
    with torch.no_grad():
        packed = _forward(model, batch).view(-1)
        for start, end, sample in _split_samples(batch, model.vocab, omni.audio):
            alone = _forward(model, sample).view(-1)
            torch.testing.assert_close(packed[start:end], alone, rtol=1e-5, atol=1e-5)
        # control: one causal mask over the whole row lets later samples see earlier ones
        whole = OmniMicrobatch(**{**batch.__dict__, "cu_seqlens": torch.tensor([0, SEQ], dtype=torch.int32)})
        leaky = _forward(model, whole).view(-1)
    second = slice(int(batch.cu_seqlens[1]), int(batch.cu_seqlens[2]))
    assert not torch.allclose(leaky[second], packed[second], atol=1e-4)


def test_mrope_on_text_equals_bare_llama_rope(world):
    """Text positions are (p, p, p): M-RoPE must reduce to the backbone's 1D RoPE, and the omni
    wrapper must leave the GPTModel computation untouched (same parameter names and values)."""
    from megatron.core.models.gpt import GPTModel

    from megatron_omni.models.llama import gpt_model_kwargs

    llm, omni, model, data = world
    (kw,) = gpt_model_kwargs(llm, ParallelConfig(), seq_length=SEQ, params_dtype=torch.float32,
                             vocab_size=model.vocab.size)
    bare = GPTModel(**kw).eval()
    missing, unexpected = bare.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.startswith(("vision.", "audio."))}, strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")] and not unexpected
    tokens = torch.randint(0, llm.vocab_size, (2, SEQ))
    labels = torch.randint(0, llm.vocab_size, (2, SEQ))
    pos = torch.arange(SEQ).expand(2, SEQ)
    with torch.no_grad():
        ref = bare(tokens, pos, None, labels=labels)
        mask, packed = model.packed_row_attention(torch.tensor([0, SEQ, 2 * SEQ], dtype=torch.int32), 2, SEQ)
        got = model(tokens, pos.expand(3, 2, SEQ), mask, packed_seq_params=packed, labels=labels)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_placeholder_count_mismatch_is_a_clear_error(world):
    _, _, model, data = world
    batch = data.next_microbatch("image")
    g = batch.image_grid_thw.clone()
    g[0, 1] += 2  # the encoder now yields more tokens than the <image_pad> span holds
    extra = int(g[0].prod()) - int(batch.image_grid_thw[0].prod())
    pv = torch.cat([batch.pixel_values, torch.zeros(extra, batch.pixel_values.shape[1])])
    bad = OmniMicrobatch(**{**batch.__dict__, "image_grid_thw": g, "pixel_values": pv})
    with pytest.raises(ValueError, match=r"<image_pad> tokens in the microbatch but the encoder produced"):
        _forward(model, bad)


def test_audio_generation_loss_is_reported_apart(world):
    _, _, model, data = world
    vocab = model.vocab
    batch = data.next_microbatch("audio_gen")
    with torch.no_grad():
        per_token = _forward(model, batch)
    _, tokens, reports = omni_loss(batch, vocab, 1.0, per_token)
    labels, mask = batch.labels, batch.loss_mask.bool()
    speech = mask & (((labels >= vocab.text_vocab_size + 17) & (labels < vocab.size))
                     | (labels == vocab.id("</audio_gen>")))
    assert speech.any() and (mask & ~speech).any()
    torch.testing.assert_close(reports[AUDIO_GEN_LOSS], torch.stack([per_token[speech].sum(), speech.sum().float()]))
    torch.testing.assert_close(reports[UNDERSTANDING_LOSS],
                               torch.stack([per_token[mask & ~speech].sum(), (mask & ~speech).sum().float()]))
    assert int(tokens) == int(mask.sum())


def test_freezing_modules(world):
    _, _, model, _ = world
    assert module_of("vision.patch_embed.weight") == "vision_encoder"
    assert module_of("vision.merger.linear_fc2.weight") == "vision_connector"
    assert module_of("audio.decoder.layers.0.mlp.linear_fc1.weight") == "audio_encoder"
    assert module_of("audio.connector.linear_fc1.weight") == "audio_connector"
    assert module_of("decoder.layers.0.mlp.linear_fc1.weight") == "llm"
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        trainable = apply_freeze([model], ["vision_encoder", "llm"])
        assert trainable["vision_encoder"] == trainable["llm"] == 0
        assert trainable["vision_connector"] > 0 and trainable["audio_encoder"] > 0
        for name, p in model.named_parameters():
            assert p.requires_grad == (saved[name] and module_of(name) not in ("vision_encoder", "llm")), name
        with pytest.raises(ValueError, match="unknown module"):
            apply_freeze([model], ["vision"])
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
