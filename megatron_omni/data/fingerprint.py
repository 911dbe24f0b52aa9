"""Content fingerprints for cache keys.

Cached artefacts (tokenized corpora, GPTDataset indices) are keyed by *content*, not by
path or mtime, so that a copied checkout or another machine reuses the same cache and an
edited file can never be served stale.
"""

from __future__ import annotations

import hashlib

_CHUNK = 1 << 20


def file_sha1(path: str) -> str:
    """Hex SHA-1 of a file's bytes, streamed in 1 MiB chunks (about 1 s per GB)."""
    digest = hashlib.sha1(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def text_sha1(*parts: str) -> str:
    """Hex SHA-1 of several strings, unambiguously joined (a NUL cannot occur in a path)."""
    return hashlib.sha1("\0".join(parts).encode("utf-8"), usedforsecurity=False).hexdigest()
