"""Preprocessing writes megatron indexed datasets that decode back to the input documents."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_omni.data import (
    DEMO_TEXT_TOKENIZER,
    CorpusFormatError,
    iter_documents,
    preprocess_corpus,
    resolve_source,
)

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _decoded(prefix, tokenizer):
    """Each stored document, checked to end in EOD, decoded without it."""
    dataset = IndexedDataset(prefix)
    out = []
    for i in range(len(dataset)):
        ids = dataset[i].tolist()
        assert ids[-1] == tokenizer.eod and tokenizer.eod not in ids[:-1]
        out.append(tokenizer.detokenize(ids[:-1]))
    return out


def test_jsonl_roundtrip(tmp_path, sp_tokenizer, demo_docs, write_jsonl):
    texts = demo_docs[:40] + ["", "  spaced\n\n\ttext  "]
    corpus = write_jsonl(tmp_path / "in.jsonl", texts)
    result = preprocess_corpus(str(corpus), str(tmp_path / "out"), sp_tokenizer)
    expected = [t for t in texts if t]
    assert (result.documents, result.skipped_empty) == (len(expected), 1)
    assert _decoded(str(tmp_path / "out"), sp_tokenizer) == expected
    assert result.tokens == sum(len(sp_tokenizer.tokenize(t)) + 1 for t in expected)
    assert not list(tmp_path.glob("*.tmp-*"))  # temporary files renamed or removed


def test_workers_give_identical_bytes(tmp_path, sp_tokenizer, small_corpus):
    preprocess_corpus(str(small_corpus), str(tmp_path / "one"), sp_tokenizer)
    preprocess_corpus(str(small_corpus), str(tmp_path / "two"), sp_tokenizer, workers=2)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"one{ext}").read_bytes() == (tmp_path / f"two{ext}").read_bytes()


def test_txt_paragraphs(tmp_path, sp_tokenizer):
    path = tmp_path / "in.txt"
    path.write_text("First paragraph,\nsecond line.\n\n\n  \nSecond paragraph.\n\nThird.", encoding="utf-8")
    docs = ["First paragraph,\nsecond line.", "Second paragraph.", "Third."]
    assert list(iter_documents(str(path))) == docs
    preprocess_corpus(str(path), str(tmp_path / "out"), sp_tokenizer)
    assert _decoded(str(tmp_path / "out"), sp_tokenizer) == docs


def test_bad_jsonl_line_names_file_and_line(tmp_path, sp_tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": "broken"\n', encoding="utf-8")
    with pytest.raises(CorpusFormatError, match=rf"{bad}:3: invalid JSON"):
        preprocess_corpus(str(bad), str(tmp_path / "out"), sp_tokenizer)
    assert not list(tmp_path.glob("out*"))  # nothing half-written
    wrong_key = tmp_path / "key.jsonl"
    wrong_key.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    missing_key = rf"{wrong_key}:2: missing key 'text' \(keys: body\).*text_key"
    with pytest.raises(CorpusFormatError, match=missing_key):
        preprocess_corpus(str(wrong_key), str(tmp_path / "out"), sp_tokenizer)
    bytes_ = tmp_path / "latin.txt"
    bytes_.write_bytes(b"fine\n\ncaf\xe9\n")
    with pytest.raises(CorpusFormatError, match=rf"{bytes_}:3: not valid UTF-8"):
        list(iter_documents(str(bytes_)))


def test_missing_prefix_points_at_preprocess_tool(tmp_path, sp_tokenizer):
    with pytest.raises(FileNotFoundError, match=r"nowhere/data\.bin.*tools/preprocess_data\.py"):
        resolve_source(str(tmp_path / "nowhere" / "data"), "text", sp_tokenizer, str(tmp_path))


def test_cli(tmp_path, small_corpus, capsys):
    """The CLI's main() in-process (a subprocess would pay megatron's import again)."""
    spec = importlib.util.spec_from_file_location("preprocess_cli", TOOLS / "preprocess_data.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "cli"
    argv = ["--input", str(small_corpus), "--output-prefix", str(out),
            "--tokenizer-type", "sentencepiece", "--tokenizer-model", DEMO_TEXT_TOKENIZER]
    assert cli.main(argv) == 0
    assert "200 documents" in capsys.readouterr().out
    assert len(IndexedDataset(str(out))) == 200
    assert cli.main(argv[:-2] + ["--tokenizer-model", str(tmp_path / "x.model")]) == 2
    assert "x.model: sentencepiece model not found" in capsys.readouterr().err
