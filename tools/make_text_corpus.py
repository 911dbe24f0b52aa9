#!/usr/bin/env python
"""Regenerate the bundled demo corpus from the docstrings of Python's standard library.

Why docstrings: they are real, well-edited English prose about programming, they ship
with every Python install (so the corpus can be rebuilt offline) and they are under the
PSF license, which permits redistribution.  The stdlib sources are parsed with `ast`
rather than imported, so no module code runs (no `antigravity` browser, no `this`).

Deterministic: files are visited in sorted order, docstrings in source order, exact
duplicates are dropped, and the JSON is written with fixed formatting.  The output
depends only on the Python version whose stdlib is read (the bundled file was made
with CPython 3.11.7).

    python tools/make_text_corpus.py --output megatron_omni/assets/demo_text/corpus.jsonl
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterator, List, Tuple

# Folders whose docstrings are test scaffolding, codec boilerplate or generated data.
SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "encodings", "lib2to3",
     "pydoc_data", "__pycache__", "__phello__"}
)
_DOC_NODES = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_sources(root: Path) -> List[Path]:
    """All stdlib `.py` files outside SKIP_DIRS, in a platform-independent sorted order."""
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if SKIP_DIRS.isdisjoint(rel.parts[:-1]):
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def docstrings(path: Path, root: Path) -> Iterator[Tuple[str, str]]:
    """(source name, docstring) for the module and each class/function in source order."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError):
        return  # a stdlib file for another Python version; not prose anyway
    module = ".".join(path.relative_to(root).with_suffix("").parts)
    doc = ast.get_docstring(tree)
    if doc:
        yield module, doc
    for node in ast.walk(tree):
        if isinstance(node, _DOC_NODES):
            doc = ast.get_docstring(node)
            if doc:
                yield f"{module}:{node.name}", doc


def make_corpus(root: Path, min_chars: int) -> List[dict]:
    """Deduplicated docstrings of at least `min_chars` characters, as corpus records."""
    seen = set()
    records = []
    for path in stdlib_sources(root):
        for source, text in docstrings(path, root):
            text = text.strip()
            if len(text) < min_chars or len(text.split()) < 20 or text in seen:
                continue
            seen.add(text)
            records.append({"text": text, "source": source})
    return records


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="megatron_omni/assets/demo_text/corpus.jsonl")
    parser.add_argument("--min-chars", type=int, default=200,
                        help="skip docstrings shorter than this (one-liners carry little prose)")
    parser.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"],
                        help="stdlib folder to read (default: this interpreter's)")
    args = parser.parse_args(argv)

    records = make_corpus(Path(args.stdlib), args.min_chars)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
    size = os.path.getsize(args.output)
    print(f"wrote {len(records)} documents, {size / 1e6:.2f} MB to {args.output} "
          f"(from {args.stdlib}, Python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
