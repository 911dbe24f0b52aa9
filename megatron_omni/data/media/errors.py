"""The one exception media decoding raises for bad input."""

from __future__ import annotations

import os


class MediaError(Exception):
    """A media file that is missing, corrupt, truncated or in an unsupported format.

    `str()` names the path and the reason.  The omni loader catches exactly this type, skips the sample,
    counts it and logs the path once; anything else escaping a decoder is a bug, not bad data.
    """

    def __init__(self, path, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (type(self), (self.path, self.reason))


def read_bytes(path) -> bytes:
    """The file's bytes, or MediaError for a missing, unreadable or empty file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise MediaError(path, "file not found") from None
    except OSError as e:
        raise MediaError(path, f"cannot read file ({e.strerror or e})") from None
    if not data:
        raise MediaError(path, "file is empty")
    return data
