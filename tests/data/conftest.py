"""Shared fixtures for the text-data tests: the bundled tokenizer and small corpora."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, List

import pytest

from megatron_omni.config.schema import DataConfig, DataSource
from megatron_omni.data import DEMO_TEXT_CORPUS, DEMO_TEXT_TOKENIZER, SentencePieceTokenizer, iter_documents


@pytest.fixture(scope="session")
def sp_tokenizer() -> SentencePieceTokenizer:
    return SentencePieceTokenizer(DEMO_TEXT_TOKENIZER)


@pytest.fixture(scope="session")
def demo_docs() -> List[str]:
    return list(iter_documents(DEMO_TEXT_CORPUS))


def _write_jsonl(path: Path, texts: List[str], key: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({key: text, "id": len(text)}) + "\n")
    return path


@pytest.fixture
def write_jsonl() -> Callable[..., Path]:
    """`write_jsonl(path, texts, key="text")`: one JSON object per text."""
    return _write_jsonl


@pytest.fixture
def small_corpus(tmp_path: Path, demo_docs: List[str]) -> Path:
    """The first 200 demo documents (~100 KB) as a JSONL file."""
    return _write_jsonl(tmp_path / "small.jsonl", demo_docs[:200])


def _data_config(*paths: str, seq_length: int = 64, **overrides) -> DataConfig:
    return DataConfig(
        blend=[DataSource(path=str(p)) for p in paths], tokenizer_type="sentencepiece",
        tokenizer_model=DEMO_TEXT_TOKENIZER, seq_length=seq_length, **overrides,
    )


@pytest.fixture
def data_config() -> Callable[..., DataConfig]:
    """`data_config(*paths, seq_length=64, **DataConfig fields)` using the bundled tokenizer."""
    return _data_config
