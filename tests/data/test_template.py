"""Chat template (paper Fig. 3) against hand-written token sequences and loss masks."""

from __future__ import annotations

import pytest
import torch

from megatron_omni.data.chat_template import DEFAULT_SYSTEM_PROMPT, ChatTemplate, MediaRef, TemplateError, Turn
from megatron_omni.config.encoders import AudioConfig, audio_token_count
from megatron_omni.models.omni_vocab import OmniVocab
from megatron_omni.models.vision.encoder import merged_token_counts

# OmniVocab(2000) layout, written out: specials follow the 2000 sentencepiece ids.
BOT, SH, EH, EOT = 2000, 2001, 2002, 2003
IMG, IMG_END, AUD, AUD_END = 2004, 2005, 2008, 2009
IMG_PAD, AUD_PAD = 2010, 2012
GEN, GEN_END, AGEN, AGEN_END = 2013, 2014, 2015, 2016
CODE0 = 2017


@pytest.fixture(scope="module")
def template(sp_tokenizer):
    return ChatTemplate(sp_tokenizer, OmniVocab(2000, audio_codebook_size=16))


def test_vocab_layout_is_the_one_written_here():
    v = OmniVocab(2000, audio_codebook_size=16)
    assert [v.id(n) for n in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")] == [
        BOT, SH, EH, EOT]
    assert (v.image_pad_id, v.audio_pad_id, v.id("<gen_image>"), v.audio_code_id(0)) == (IMG_PAD, AUD_PAD, GEN, CODE0)


def test_two_turn_image_audio_gen_image(template, sp_tokenizer):
    enc = sp_tokenizer.encode
    n_img = int(merged_token_counts(torch.tensor([[1, 4, 6]]), 2).sum())  # 6 tokens: 1*4*6/4
    n_aud = int(audio_token_count(45, AudioConfig(d_model=64, num_attention_heads=4)))  # ceil(ceil(45/2)/4) = 6
    assert (n_img, n_aud) == (6, 6)
    turns = [
        Turn("user", "<image>img/a.jpg</image>\nWhat is shown?"),
        Turn("assistant", "A red square."),
        Turn("user", "<audio>aud/b.opus</audio>\nDraw what you hear."),
        Turn("assistant", "A dog barking. <gen_image>a dog barking in a park</gen_image>"),
    ]
    out = template.render(turns, [n_img, n_aud])

    nl2 = enc("\n\n")
    system = [BOT, SH, *enc("system"), EH, *nl2, *enc(DEFAULT_SYSTEM_PROMPT), EOT]
    user1 = [SH, *enc("user"), EH, *nl2, IMG, *[IMG_PAD] * 6, IMG_END, *enc("\nWhat is shown?"), EOT]
    head = [SH, *enc("assistant"), EH, *nl2]
    answer1 = [*enc("A red square."), EOT]
    user2 = [SH, *enc("user"), EH, *nl2, AUD, *[AUD_PAD] * 6, AUD_END, *enc("\nDraw what you hear."), EOT]
    answer2 = [*enc("A dog barking. "), GEN, *enc("a dog barking in a park"), GEN_END, EOT]
    expected = system + user1 + head + answer1 + user2 + head + answer2
    is_target = ([0] * len(system + user1 + head) + [1] * len(answer1) + [0] * len(user2 + head)
                 + [1] * len(answer2))
    assert out.tokens == expected
    assert out.is_target == [bool(t) for t in is_target]
    assert out.media == [MediaRef("image", "img/a.jpg"), MediaRef("audio", "aud/b.opus")]

    labels, loss_mask = out.labels_and_loss_mask()
    assert labels == expected[1:] + [0]
    assert loss_mask == [float(t) for t in is_target[1:]] + [0.0]
    # The mask's 1s predict exactly the answer tokens, each answer's <|eot_id|> included.
    assert [lab for lab, m in zip(labels, loss_mask) if m] == answer1 + answer2
    assert out.tokens.count(IMG_PAD) == n_img and out.tokens.count(AUD_PAD) == n_aud


def test_speech_answer_codes_and_custom_system(template, sp_tokenizer):
    enc = sp_tokenizer.encode
    turns = [Turn("system", "Speak."), Turn("user", "Say hi."), Turn("assistant", "Hi!", audio_codes=[3, 0, 15])]
    out = template.render(turns)
    answer = [*enc("Hi!"), AGEN, CODE0 + 3, CODE0, CODE0 + 15, AGEN_END, EOT]
    system = [BOT, SH, *enc("system"), EH, *enc("\n\n"), *enc("Speak."), EOT]
    assert out.tokens[:len(system)] == system
    assert out.tokens[-len(answer):] == answer
    assert out.is_target[-len(answer):] == [True] * len(answer)
    assert not any(out.is_target[:-len(answer)])
    with pytest.raises(ValueError, match="outside the codebook"):
        template.render([Turn("user", "x"), Turn("assistant", "y", audio_codes=[16])])


def test_document_all_targets_but_media(template, sp_tokenizer):
    enc = sp_tokenizer.encode
    out = template.render_document("Before <image>p.png</image> after.", [4])
    expected = [BOT, *enc("Before "), IMG, *[IMG_PAD] * 4, IMG_END, *enc(" after."), sp_tokenizer.eos_id]
    assert out.tokens == expected
    n_before = len(enc("Before "))
    assert out.is_target == [False] + [True] * n_before + [False] * 6 + [True] * (len(enc(" after.")) + 1)
    plain = template.render_document("Just text.")
    assert plain.labels_and_loss_mask()[1] == [1.0] * (len(plain.tokens) - 1) + [0.0]


def test_template_errors(template, sp_tokenizer):
    with pytest.raises(TemplateError, match="one count per media reference"):
        template.render([Turn("user", "<image>a.jpg</image>"), Turn("assistant", "x")])
    with pytest.raises(TemplateError, match="left over"):
        template.render([Turn("user", "q"), Turn("assistant", "x")], [4])
    with pytest.raises(TemplateError, match="assistant turns cannot reference input media"):
        template.render([Turn("user", "q"), Turn("assistant", "<image>a.jpg</image>")])
    with pytest.raises(TemplateError, match="OmniVocab"):
        ChatTemplate(sp_tokenizer, OmniVocab(1999))


def test_prompt_ends_with_assistant_header(template, sp_tokenizer):
    enc = sp_tokenizer.encode
    out = template.render_prompt([Turn("user", "Hi")])
    tail = [*enc("Hi"), EOT, SH, *enc("assistant"), EH, *enc("\n\n")]
    assert out.tokens[-len(tail):] == tail
    assert not any(out.is_target)
