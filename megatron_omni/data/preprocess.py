"""Tokenize a `.jsonl`/`.txt` corpus into a megatron indexed dataset (`PREFIX.bin/.idx`).

Each document becomes one sequence `tokenize(text) + [eod]`, written with megatron-core's
`IndexedDatasetBuilder`, so `GPTDataset` reads it exactly like Megatron-LM's preprocessed
data.  Empty documents are skipped (they would be a lone EOD).

The output is deterministic: documents keep file order even with worker processes
(`imap` is ordered).  Files are written under temporary names and renamed into place,
`.idx` last, so an interrupted run never leaves a prefix that looks complete; this is
what makes the on-first-use cache in `text.py` safe.
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional

import numpy
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from megatron_omni.data.documents import iter_documents
from megatron_omni.data.tokenizer import TextTokenizer

__all__ = ["PreprocessResult", "preprocess_corpus"]

_CHUNKSIZE = 64  # documents per worker task: amortises pickling, keeps memory small


@dataclass(frozen=True)
class PreprocessResult:
    """What was written, for logs and tests."""

    prefix: str
    documents: int
    tokens: int  # including one EOD per document
    skipped_empty: int


# The tokenizer of a worker process, set once by the pool initializer.
_worker_tokenizer: Optional[TextTokenizer] = None


def _init_worker(tokenizer: TextTokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_in_worker(text: str) -> List[int]:
    assert _worker_tokenizer is not None
    return _encode(_worker_tokenizer, text)


def _encode(tokenizer: TextTokenizer, text: str) -> List[int]:
    """Token ids of one document followed by EOD (empty list for an empty document)."""
    if not text:
        return []
    return list(tokenizer.tokenize(text)) + [tokenizer.eod]


def _encoded_documents(
    path: str, text_key: str, tokenizer: TextTokenizer, workers: int
) -> Iterator[List[int]]:
    documents = iter_documents(path, text_key)
    if workers <= 1:
        for text in documents:
            yield _encode(tokenizer, text)
        return
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        yield from pool.imap(_encode_in_worker, documents, chunksize=_CHUNKSIZE)


def preprocess_corpus(
    input_path: str,
    output_prefix: str,
    tokenizer: TextTokenizer,
    *,
    text_key: str = "text",
    workers: int = 1,
) -> PreprocessResult:
    """Write `output_prefix.bin` / `.idx` from the documents of `input_path`."""
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp_prefix = f"{output_prefix}.tmp-{os.getpid()}"
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(get_bin_path(tmp_prefix), dtype=dtype)
    documents = tokens = skipped = 0
    try:
        for ids in _encoded_documents(input_path, text_key, tokenizer, workers):
            if not ids:
                skipped += 1
                continue
            builder.add_document(numpy.asarray(ids, dtype=dtype), [len(ids)])
            documents += 1
            tokens += len(ids)
        if documents == 0:
            raise ValueError(
                f"{input_path}: no non-empty documents found (text key {text_key!r}); "
                f"check the file and the text key"
            )
        builder.finalize(get_idx_path(tmp_prefix))
        if os.path.exists(get_idx_path(output_prefix)):  # never pair a new .bin with an old .idx
            os.remove(get_idx_path(output_prefix))
        os.replace(get_bin_path(tmp_prefix), get_bin_path(output_prefix))
        os.replace(get_idx_path(tmp_prefix), get_idx_path(output_prefix))
    finally:
        builder.data_file.close()
        for leftover in (get_bin_path(tmp_prefix), get_idx_path(tmp_prefix)):
            if os.path.exists(leftover):
                os.remove(leftover)
    return PreprocessResult(output_prefix, documents, tokens, skipped)
