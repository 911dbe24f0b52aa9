#!/usr/bin/env python
"""Tokenize a .jsonl/.txt corpus into a megatron indexed dataset PREFIX.bin/.idx (thin CLI).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-type sentencepiece --tokenizer-model megatron_omni/assets/demo_text/tokenizer.model

Then name `data/corpus` (no extension) as a `data.blend[].path`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_omni.config.schema import DataConfig  # noqa: E402
from megatron_omni.data.documents import CorpusFormatError  # noqa: E402
from megatron_omni.data.preprocess import preprocess_corpus  # noqa: E402
from megatron_omni.data.tokenizer import build_tokenizer  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Tokenize a corpus into PREFIX.bin/.idx.")
    parser.add_argument("--input", required=True, help=".jsonl (one object per line) or .txt")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--tokenizer-type", default="sentencepiece",
                        choices=("sentencepiece", "null", "huggingface"))
    parser.add_argument("--tokenizer-model", help="sentencepiece .model file")
    parser.add_argument("--vocab-size", type=int, help="vocabulary size of the null tokenizer")
    parser.add_argument("--text-key", default="text", help="JSON field holding the text")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    args = parser.parse_args(argv)
    try:
        data_cfg = DataConfig(tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model)
        tokenizer = build_tokenizer(data_cfg, vocab_size=args.vocab_size)
        result = preprocess_corpus(
            args.input, args.output_prefix, tokenizer, text_key=args.text_key, workers=args.workers
        )
    except (CorpusFormatError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {result.prefix}.bin/.idx: {result.documents} documents, {result.tokens} tokens"
          + (f", {result.skipped_empty} empty documents skipped" if result.skipped_empty else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
