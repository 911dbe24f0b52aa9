"""Text data: tokenizers, corpus preprocessing, megatron GPT datasets and the DP sampler.

Typical use (every rank):

    tokenizer = build_tokenizer(cfg.data, vocab_size=cfg.model.vocab_size)
    train, valid, test = build_text_datasets(cfg.data, tokenizer, seed=cfg.train.seed,
                                             num_samples=(n_train, n_valid, n_test),
                                             cache_dir=cache_dir)
    sampler = DataParallelSampler(len(train), consumed, mbs, dp_rank, dp_size)
    batches = text_microbatches(train, sampler)
"""

import os

from megatron_omni.data.documents import CorpusFormatError, iter_documents
from megatron_omni.data.preprocess import PreprocessResult, preprocess_corpus
from megatron_omni.data.sampler import DataParallelSampler, collate_text_samples, text_microbatches
from megatron_omni.data.sources import ensure_tokenized, resolve_source
from megatron_omni.data.text import build_text_datasets
from megatron_omni.data.tokenizer import (
    NullTokenizer,
    SentencePieceTokenizer,
    TextTokenizer,
    build_tokenizer,
)
from megatron_omni.data.train_tokenizer import train_sentencepiece

_ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
DEMO_TEXT_CORPUS = os.path.join(_ASSETS, "demo_text", "corpus.jsonl")
"""Bundled ~1.4 MB English corpus (Python stdlib docstrings, PSF license)."""
DEMO_TEXT_TOKENIZER = os.path.join(_ASSETS, "demo_text", "tokenizer.model")
"""Sentencepiece BPE model with 2000 pieces trained on DEMO_TEXT_CORPUS."""

__all__ = [
    "CorpusFormatError", "DEMO_TEXT_CORPUS", "DEMO_TEXT_TOKENIZER", "DataParallelSampler",
    "NullTokenizer", "PreprocessResult", "SentencePieceTokenizer", "TextTokenizer",
    "build_text_datasets", "build_tokenizer", "collate_text_samples", "ensure_tokenized",
    "iter_documents", "preprocess_corpus", "resolve_source", "text_microbatches",
    "train_sentencepiece",
]
