"""Read raw text documents from a `.jsonl` or `.txt` file.

Both the tokenizer trainer and the preprocessor read corpora through this one function,
so they agree on what a "document" is and a malformed line is reported the same way:
as `FILE:LINE: what is wrong; how to fix it`, never as a bare JSONDecodeError or KeyError
from deep inside a worker pool.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

TEXT_SUFFIXES = (".jsonl", ".txt")


class CorpusFormatError(ValueError):
    """A corpus file cannot be read; the message names the file, the line and the fix."""


def is_raw_text_path(path: str) -> bool:
    """True for the file types `iter_documents` reads (and that need tokenizing first)."""
    return path.endswith(TEXT_SUFFIXES)


def iter_documents(path: str, text_key: str = "text") -> Iterator[str]:
    """Yield the documents of `path` in file order.

    `.jsonl`: one JSON object per line, the document is `obj[text_key]` (blank lines are
    skipped).  `.txt`: documents are paragraphs separated by one or more blank lines;
    a paragraph's lines are joined with newlines.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: corpus file not found")
    if path.endswith(".jsonl"):
        yield from _jsonl_documents(path, text_key)
    elif path.endswith(".txt"):
        yield from _txt_documents(path)
    else:
        raise CorpusFormatError(
            f"{path}: unsupported corpus type; use one of {', '.join(TEXT_SUFFIXES)} "
            f"or an already tokenized megatron prefix (see tools/preprocess_data.py)"
        )


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line without its newline); bad UTF-8 names its line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise CorpusFormatError(
                    f"{path}:{lineno}: not valid UTF-8 ({err.reason} at byte {err.start}); "
                    f"re-encode the file as UTF-8"
                ) from None
            yield lineno, line.rstrip("\r\n")


def _jsonl_documents(path: str, text_key: str) -> Iterator[str]:
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusFormatError(
                f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno}); "
                f"each line must be one JSON object such as {{\"{text_key}\": \"...\"}}"
            ) from None
        if not isinstance(record, dict):
            raise CorpusFormatError(
                f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}; "
                f"each line must look like {{\"{text_key}\": \"...\"}}"
            )
        if text_key not in record:
            keys = ", ".join(sorted(record)) or "none"
            raise CorpusFormatError(
                f"{path}:{lineno}: missing key {text_key!r} (keys: {keys}); add it, or name "
                f"the right field with text_key (data.blend[].text_key / --text-key)"
            )
        text = record[text_key]
        if not isinstance(text, str):
            raise CorpusFormatError(
                f"{path}:{lineno}: {text_key!r} must be a string, got {type(text).__name__}"
            )
        yield text


def _txt_documents(path: str) -> Iterator[str]:
    paragraph: list[str] = []
    for _, line in _lines(path):
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "\n".join(paragraph)
            paragraph = []
    if paragraph:
        yield "\n".join(paragraph)
