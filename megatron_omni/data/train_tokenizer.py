"""Train a small sentencepiece model on a corpus, reproducibly.

The trainer settings are chosen so that `detokenize(tokenize(doc)) == doc` for any UTF-8
document (the preprocess round-trip test relies on it):

* `normalization_rule_name="identity"` and `remove_extra_whitespaces=False`: no NFKC
  folding, no whitespace collapsing;
* `byte_fallback=True`: characters outside the learned pieces (newlines, tabs, rare
  symbols) become byte tokens instead of `<unk>`.

Ids 0-3 are fixed (`<unk>`, `<s>`, `</s>`, `<pad>`) so EOD (`</s>` = 2) and a pad id that
collides with nothing exist in every model we make.  One trainer thread, unshuffled input
and a fixed seed make the `.model` bytes depend only on the corpus and the options.
"""

from __future__ import annotations

import io
import os
from typing import Iterator, List

import sentencepiece as spm

from megatron_omni.data.documents import iter_documents

# sentencepiece drops training "sentences" longer than this many bytes; documents are
# fed line by line, so only pathological lines reach it.
_MAX_SENTENCE_BYTES = 16384


def _training_lines(corpus: str, text_key: str) -> Iterator[str]:
    """Non-empty lines of every document: sentencepiece trains on lines, not documents."""
    for doc in iter_documents(corpus, text_key):
        for line in doc.split("\n"):
            if line.strip():
                yield line


def train_sentencepiece(
    corpus: str,
    model_prefix: str,
    *,
    vocab_size: int = 2000,
    model_type: str = "bpe",
    text_key: str = "text",
    seed: int = 1234,
) -> str:
    """Train on `corpus` (`.jsonl` or `.txt`) and write `PREFIX.model`; returns its path."""
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    if vocab_size < 300:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: 256 byte-fallback pieces and 4 special "
            f"pieces are always in the vocabulary; use at least 300"
        )
    # Read everything first (the trainer holds all sentences in memory anyway) so that a
    # corpus error surfaces as itself, not wrapped in sentencepiece's RuntimeError.
    lines = list(_training_lines(corpus, text_key))
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        _train(lines, model, vocab_size, model_type)
    except RuntimeError as err:
        raise ValueError(
            f"{corpus}: sentencepiece training failed ({str(err).strip()}); a small corpus "
            f"may not support vocab_size={vocab_size} - lower it or add text"
        ) from None
    path = model_prefix + ".model"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


def _train(lines: List[str], model: io.BytesIO, vocab_size: int, model_type: str) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=_MAX_SENTENCE_BYTES,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        num_threads=1,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        minloglevel=2,
    )
