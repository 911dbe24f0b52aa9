#!/usr/bin/env python
"""Train a sentencepiece tokenizer on a .jsonl/.txt corpus (thin CLI).

    python tools/train_tokenizer.py --input megatron_omni/assets/demo_text/corpus.jsonl \
        --output-prefix megatron_omni/assets/demo_text/tokenizer --vocab-size 2000

See megatron_omni/data/train_tokenizer.py for the trainer settings and why.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_omni.data.documents import CorpusFormatError  # noqa: E402
from megatron_omni.data.train_tokenizer import train_sentencepiece  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Train a sentencepiece tokenizer.")
    parser.add_argument("--input", required=True, help=".jsonl (one object per line) or .txt corpus")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.model")
    parser.add_argument("--vocab-size", type=int, default=2000)
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--text-key", default="text", help="JSON field holding the text")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    try:
        path = train_sentencepiece(
            args.input, args.output_prefix, vocab_size=args.vocab_size,
            model_type=args.model_type, text_key=args.text_key, seed=args.seed,
        )
    except (CorpusFormatError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path} (vocab size {args.vocab_size}, {args.model_type})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
