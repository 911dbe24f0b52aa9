"""Turn a `DataSource.path` into a megatron indexed-dataset prefix.

* `X.jsonl` / `X.txt`: tokenized on first use into `CACHE/tokenized/X-<key>.bin/.idx`,
  where `<key>` hashes the corpus bytes, the tokenizer identity (model SHA-1) and the text
  key - so editing any of them re-tokenizes, and nothing else does.
* anything else is a prefix used as is (a trailing `.bin`/`.idx` is tolerated); a missing
  pair is a clear error pointing at `tools/preprocess_data.py`.

Under torch.distributed only global rank 0 tokenizes; the other ranks wait at a barrier
(any backend, gloo included) and then read the same files, so `cache_dir` must be on a
filesystem all ranks share - the same assumption megatron's own index cache makes.  A
failure on rank 0 is re-raised there after the barrier, so the other ranks fail with a
message instead of hanging.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Tuple

import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_omni.data.documents import is_raw_text_path
from megatron_omni.data.fingerprint import file_sha1, text_sha1
from megatron_omni.data.preprocess import preprocess_corpus
from megatron_omni.data.tokenizer import TextTokenizer

__all__ = ["resolve_source", "ensure_tokenized", "tokenized_cache_prefix"]

logger = logging.getLogger(__name__)


def tokenized_cache_prefix(path: str, text_key: str, tokenizer: TextTokenizer, cache_dir: str) -> str:
    """Where the tokenized form of corpus `path` lives under `cache_dir` (content-addressed)."""
    tokenizer_id = json.dumps(tokenizer.unique_identifiers, sort_keys=True, default=str)
    key = text_sha1(file_sha1(path), tokenizer_id, text_key)[:16]
    return os.path.join(cache_dir, "tokenized", f"{Path(path).stem}-{key}")


def ensure_tokenized(
    path: str, text_key: str, tokenizer: TextTokenizer, cache_dir: str
) -> Tuple[str, bool]:
    """(prefix, whether this process wrote it) for corpus `path`; tokenizes on a cache miss.

    Must be called on every rank when torch.distributed is initialized (it has a barrier).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data source {path!r}: file not found")
    prefix = tokenized_cache_prefix(path, text_key, tokenizer, cache_dir)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    is_writer = not distributed or torch.distributed.get_rank() == 0

    wrote, failure = False, None
    if is_writer and not IndexedDataset.exists(prefix):
        try:
            result = preprocess_corpus(path, prefix, tokenizer, text_key=text_key)
            wrote = True
            logger.info("tokenized %s -> %s (%d documents, %d tokens)",
                        path, prefix, result.documents, result.tokens)
        except Exception as err:  # re-raised below, after the other ranks are released
            failure = err
    if distributed:
        torch.distributed.barrier()
    if failure is not None:
        raise failure
    if not IndexedDataset.exists(prefix):
        raise RuntimeError(
            f"data source {path!r}: rank 0 did not produce {prefix}.bin/.idx (see rank 0's "
            f"error); if ranks run on different machines, data.cache_dir must be shared"
        )
    return prefix, wrote


def resolve_source(path: str, text_key: str, tokenizer: TextTokenizer, cache_dir: str) -> str:
    """The indexed-dataset prefix for one blend entry (see the module docstring)."""
    if is_raw_text_path(path):
        return ensure_tokenized(path, text_key, tokenizer, cache_dir)[0]
    prefix = path[: -len(".bin")] if path.endswith((".bin", ".idx")) else path
    if not IndexedDataset.exists(prefix):
        raise FileNotFoundError(
            f"data source {path!r}: no {prefix}.bin / {prefix}.idx found. Either name a "
            f".jsonl/.txt corpus (tokenized on first use), or tokenize it once with "
            f"'python tools/preprocess_data.py --input CORPUS.jsonl --output-prefix {prefix} "
            f"--tokenizer-model MODEL' and keep this prefix"
        )
    return prefix
