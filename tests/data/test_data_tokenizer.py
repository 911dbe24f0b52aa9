"""Tokenizers: ids round-trip, special ids exist, config errors are actionable."""

from __future__ import annotations

import pickle

import pytest

from megatron_omni.config.schema import DataConfig
from megatron_omni.data import (
    DEMO_TEXT_TOKENIZER,
    NullTokenizer,
    SentencePieceTokenizer,
    TextTokenizer,
    build_tokenizer,
    train_sentencepiece,
)
from megatron_omni.data.tokenizer import MegatronTokenizerText


def test_bundled_tokenizer_special_ids(sp_tokenizer):
    assert sp_tokenizer.vocab_size == 2000  # tiny model has vocab_size 2000
    assert sp_tokenizer.eod == 2 and sp_tokenizer.vocab[2] == "</s>"
    assert sp_tokenizer.pad == 3 and sp_tokenizer.bos == 1
    assert isinstance(sp_tokenizer, TextTokenizer)
    assert isinstance(sp_tokenizer, MegatronTokenizerText)  # what GPTDatasetConfig expects


def test_sentencepiece_roundtrip_is_exact(sp_tokenizer, demo_docs):
    tricky = "  Leading spaces,\ttabs\nnewlines\n\n  indented >>> code()\nünïcødé – “quotes” 12345"
    for text in demo_docs[:300] + [tricky]:
        ids = sp_tokenizer.tokenize(text)
        assert sp_tokenizer.eod not in ids
        assert all(0 <= i < sp_tokenizer.vocab_size for i in ids)
        assert sp_tokenizer.detokenize(ids) == text


def test_sentencepiece_pickles_and_identity_is_content(sp_tokenizer, tmp_path):
    clone = pickle.loads(pickle.dumps(sp_tokenizer))
    assert clone.tokenize("Return the value.") == sp_tokenizer.tokenize("Return the value.")
    copy = tmp_path / "moved.model"
    copy.write_bytes(open(DEMO_TEXT_TOKENIZER, "rb").read())
    assert SentencePieceTokenizer(str(copy)).unique_identifiers == sp_tokenizer.unique_identifiers


def test_null_tokenizer():
    tok = NullTokenizer(100)
    assert tok.vocab_size == 100 and tok.eod == 99
    assert tok.tokenize("1 2  3\n4") == [1, 2, 3, 4]
    assert tok.detokenize([5, 6]) == "5 6"
    assert pickle.loads(pickle.dumps(tok)).vocab_size == 100
    with pytest.raises(ValueError, match="'x' is not an integer"):
        tok.tokenize("1 x")
    with pytest.raises(ValueError, match="outside"):
        tok.tokenize("100")


def test_build_tokenizer_choices_and_errors(tmp_path):
    sp = build_tokenizer(DataConfig(tokenizer_type="sentencepiece", tokenizer_model=DEMO_TEXT_TOKENIZER))
    assert sp.vocab_size == 2000
    assert build_tokenizer(DataConfig(tokenizer_type="null"), vocab_size=50).eod == 49
    with pytest.raises(ValueError, match="vocab_size=model.vocab_size"):
        build_tokenizer(DataConfig(tokenizer_type="null"))
    with pytest.raises(ValueError, match="Llama-3"):
        build_tokenizer(DataConfig(tokenizer_type="huggingface"))
    with pytest.raises(ValueError, match="tokenizer_model is not set"):
        build_tokenizer(DataConfig(tokenizer_type="sentencepiece"))
    missing = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="nope.model.*train_tokenizer.py"):
        build_tokenizer(DataConfig(tokenizer_model=missing))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model: not a valid sentencepiece model"):
        SentencePieceTokenizer(str(junk))


def test_train_sentencepiece_is_deterministic(tmp_path, demo_docs, write_jsonl):
    corpus = write_jsonl(tmp_path / "c.jsonl", demo_docs[:150])
    a = train_sentencepiece(str(corpus), str(tmp_path / "a"), vocab_size=500)
    b = train_sentencepiece(str(corpus), str(tmp_path / "b"), vocab_size=500)
    assert open(a, "rb").read() == open(b, "rb").read()
    tok = SentencePieceTokenizer(a)
    assert tok.vocab_size == 500 and tok.eod == 2
    assert tok.detokenize(tok.tokenize(demo_docs[0])) == demo_docs[0]
