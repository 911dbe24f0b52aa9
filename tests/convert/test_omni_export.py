"""mcore-to-hf on an omni checkpoint (a TP2 x PP2 tiny training run's checkpoints/): the exported folder runs
in transformers (trust_remote_code; its Llama, Qwen2-VL vision and Whisper encoder modules) with no missing
or unexpected keys, its logits on a mixed image + video + audio + text sample equal the megatron forward
(fp32), its encoder tensors equal megatron's bit for bit (read through the older, independent
models/*/hf_* name maps), generate() gives megatron's greedy tokens, its M-RoPE ids are ours, and
--language-model-only writes a LlamaForCausalLM with megatron's text logits."""

from __future__ import annotations

import pytest
import torch

from tests.convert.omni_export_helpers import GREEDY_STEPS, hf_inputs

transformers = pytest.importorskip("transformers")
TOL = 1e-4


def test_folder_loads_with_no_missing_or_unexpected_keys_and_logits_equal_megatron(exported, hf_model):
    model, info = hf_model
    assert type(model).__name__ == "MegatronOmniForCausalLM"
    assert {k: v for k, v in info.items() if v} == {}, info  # missing / unexpected / mismatched keys
    names = {type(m).__name__ for m in model.modules()}
    assert {"LlamaModel", "Qwen2VisionTransformerPretrainedModel", "WhisperEncoder"} <= names
    inputs = hf_inputs(exported["sample"])
    with torch.no_grad():
        got = model(**inputs).logits
        blind = model(**{**inputs, "pixel_values": torch.zeros_like(inputs["pixel_values"]),
                         "input_features": torch.zeros_like(inputs["input_features"])}).logits
    ref = exported["ref"]["logits"]
    assert got.shape == ref.shape == (1, inputs["input_ids"].shape[1], exported["ref"]["vocab"].size)
    delta = (got - ref).abs().max().item()
    print(f"\nmixed image+video+audio+text sample: max|d| HF vs megatron {delta:.2e} (logit scale "
          f"{ref.abs().max():.2f}); {exported['reports']['omni']['tensors']} tensors exported in "
          f"{exported['reports']['omni']['seconds']} s")
    assert delta <= TOL
    assert (blind - got).abs().max() > 1e-3  # the image and audio inputs do reach the logits


def test_encoder_tensors_bit_exact(exported, hf_model):
    from megatron_omni.models.audio.hf_whisper import whisper_hf_to_megatron
    from megatron_omni.models.vision.hf_weights import megatron_to_hf

    model, _ = hf_model
    omni = exported["omni"]
    ours = exported["ref"]
    hf_vision = model.visual.state_dict()
    expected = megatron_to_hf(ours["vision"], omni.vision, te=False)
    assert set(expected) == set(hf_vision)
    for name, t in expected.items():
        assert torch.equal(hf_vision[name], t), name
    hf_audio = {k: v for k, v in model.audio_tower.state_dict().items()}
    mapped = whisper_hf_to_megatron(hf_audio, omni.audio.num_layers, omni.audio.num_attention_heads)
    params = {k: v for k, v in ours["audio"].items() if not k.endswith("_extra_state") and not k.startswith("connector.")}
    assert set(mapped) == set(params)
    for name, t in mapped.items():
        assert torch.equal(params[name], t), name
    connector = model.audio_connector.state_dict()
    assert set(connector) == {k[len("connector."):] for k in ours["audio"] if k.startswith("connector.")}
    for name, t in connector.items():
        assert torch.equal(ours["audio"]["connector." + name], t), name
    assert hf_vision["blocks.0.norm1.bias"].abs().max() > 0  # trained off the init: the maps are exercised


def test_generate_gives_megatron_greedy_tokens(exported, hf_model):
    model, _ = hf_model
    inputs = hf_inputs(exported["sample"])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=GREEDY_STEPS, do_sample=False)
    got = out[0, inputs["input_ids"].shape[1]:].tolist()
    print(f"\ngreedy tokens: HF generate {got}, megatron {exported['ref']['greedy']}")
    assert got == exported["ref"]["greedy"]


def test_mrope_ids_of_the_modeling_file_equal_ours(exported):
    from megatron_omni.hf.modeling_megatron_omni import omni_rope_index
    from megatron_omni.models.rope import mrope_position_ids

    vocab = exported["ref"]["vocab"]
    kw = dict(image_token_id=vocab.image_pad_id, video_token_id=vocab.video_pad_id, spatial_merge_size=2)
    s = exported["sample"]
    # the mixed sample, and a left-padded batch of two rows (two images + a video across the batch)
    ids = s["input_ids"][0].tolist()
    rows = [[5, 6] + [vocab.image_pad_id] * 4 + [7] + [vocab.video_pad_id] * 8 + [8, 9],
            [0, 0, 0, 0, 0, 3, vocab.image_pad_id, vocab.image_pad_id, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
    batch = torch.tensor(rows)
    mask = torch.tensor([[1] * 17, [0] * 5 + [1] * 12])
    cases = [(torch.tensor([ids]), s["image_grid_thw"], s["video_grid_thw"], None),
             (batch, torch.tensor([[1, 4, 4], [1, 2, 4]]), torch.tensor([[2, 4, 4]]), mask)]
    for input_ids, image, video, attention in cases:
        ref, _ = mrope_position_ids(input_ids, image, video, attention, **kw)
        got, deltas = omni_rope_index(input_ids, image, video, attention, **kw)
        assert torch.equal(got, ref)
        assert torch.equal(deltas[:, 0], got.amax(dim=(0, 2)) + 1 - input_ids.shape[1])


def test_tokenizer_has_the_omni_tokens_at_their_ids(exported):
    import sentencepiece

    from megatron_omni.convert.omni_hf_config import special_token_names

    vocab = exported["ref"]["vocab"]
    tok = transformers.AutoTokenizer.from_pretrained(exported["root"] / "hf", trust_remote_code=True)
    assert len(tok) == vocab.size
    names = special_token_names(vocab)
    assert tok.convert_tokens_to_ids(names) == list(range(vocab.text_vocab_size, vocab.size))
    sp = sentencepiece.SentencePieceProcessor(model_file=exported["reports"]["omni"]["tokenizer"]["source"])
    # Leading / repeated spaces too: the data pipeline encodes the text between media spans as its own piece.
    for text in ("Hello world, this is a test.", "M2-omni sees images and hears audio.", " and then",
                 "  two  spaces ", " ", "\n\n"):
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
    assert vocab.image_pad_id in tok.encode("a <image_pad> b", add_special_tokens=False)  # parsed as one token


def test_language_model_only_folder_is_a_llama_with_megatron_text_logits(exported):
    path = exported["root"] / "hf_llm"
    assert not (path / "modeling_megatron_omni.py").exists()
    model, info = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info
    ref = exported["ref"]
    with torch.no_grad():
        got = model.eval()(ref["text_ids"]).logits
    assert got.shape == ref["text_logits"].shape
    delta = (got - ref["text_logits"]).abs().max().item()
    print(f"\n--language-model-only: LlamaForCausalLM vs megatron text logits max|d| {delta:.2e}")
    assert delta <= TOL


def test_bf16_export_runs_forward_and_generate(exported):
    from megatron_omni.convert import mcore_to_hf

    path = exported["root"] / "hf_bf16"
    report = mcore_to_hf(str(exported["ckpt"]), str(path), dtype="bf16")
    assert report["dtype"] == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    assert model.dtype == torch.bfloat16
    inputs = hf_inputs(exported["sample"])
    with torch.no_grad():
        got = model(**inputs).logits.float()
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    ref = exported["ref"]["logits"]
    delta = (got - ref).abs().max().item()
    print(f"\nbf16 folder vs fp32 megatron: max|d| {delta:.2e} (logit scale {ref.abs().max():.2f})")
    assert delta <= 0.05 * ref.abs().max().item() and out.shape[1] == inputs["input_ids"].shape[1] + 2


def test_run_to_hf_to_omni_round_trip_is_bit_identical(exported, tmp_path):
    """hf-to-mcore reads the exported folder back: every model tensor of the training checkpoint, bit for bit
    (the vocabulary's TP padding rows excepted: training moves the output layer's, the folder has none)."""
    from megatron_omni.convert import hf_to_mcore
    from megatron_omni.convert.mcore_io import CheckpointReader

    back = tmp_path / "omni_again"
    hf_to_mcore(str(exported["root"] / "hf"), str(back), tp=2, pp=2)
    first, again = CheckpointReader(str(exported["ckpt"])), CheckpointReader(str(back))
    assert set(again.model_keys()) == set(first.model_keys())
    rows = exported["ref"]["vocab"].size
    for key in first.model_keys():
        a, b = first.read({"t": (key, None)})["t"], again.read({"t": (key, None)})["t"]
        if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            assert a.shape == b.shape and not b[rows:].any()
            a, b = a[:rows], b[:rows]
        assert torch.equal(a, b), key
