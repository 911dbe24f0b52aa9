"""Checkpoint integrity: a checksum manifest per checkpoint, verified on load; pruning by write order.

`iter_<step>/checksums.json` lists every file of the checkpoint with its size and CRC32 and is
written after every rank finished writing and before the tracker file moves: it is the commit
marker (a folder without it is a partial or pre-manifest checkpoint).  The files are hashed and
verified in parallel, file i by rank i % world, streaming in 16 MiB blocks (no file is read whole).

Pruning (`train.keep_last_checkpoints`) keeps the newest checkpoints in *write* order (the
manifest's sequence number), never the one the tracker points at nor the one this run loaded: a
run restarted from an early step in a folder that still holds a later, abandoned branch prunes
the abandoned branch, not its own new checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import zlib
from typing import Dict, List, Optional, Sequence

import torch.distributed as dist

log = logging.getLogger(__name__)

MANIFEST = "checksums.json"
_BLOCK = 16 * 2 ** 20


class CorruptCheckpoint(RuntimeError):
    """A checkpoint file is missing, truncated or does not match its checksum."""


def file_crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_BLOCK)
            if not block:
                return crc
            crc = zlib.crc32(block, crc)


def _checkpoint_files(path: str) -> List[str]:
    return sorted(n for n in os.listdir(path) if n != MANIFEST and os.path.isfile(os.path.join(path, n)))


def _gather_to_all(local: dict) -> dict:
    """Merge every rank's dict (a collective)."""
    parts: List[Optional[dict]] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged


def write_manifest(path: str, step: int) -> None:
    """Collective: hash the checkpoint's files (shared over ranks); rank 0 writes the manifest."""
    names = _checkpoint_files(path) if dist.get_rank() == 0 else None
    box = [names]
    dist.broadcast_object_list(box, src=0)
    rank, world = dist.get_rank(), dist.get_world_size()
    local = {}
    for name in box[0][rank::world]:
        full = os.path.join(path, name)
        local[name] = {"size": os.path.getsize(full), "crc32": file_crc32(full)}
    files = _gather_to_all(local)
    if rank == 0:
        manifest = {"step": step, "written_at": time.time(), "sequence": _next_sequence(os.path.dirname(path)),
                    "files": files}
        tmp = os.path.join(path, MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(path, MANIFEST))


def read_manifest(path: str) -> Optional[dict]:
    full = os.path.join(path, MANIFEST)
    if not os.path.isfile(full):
        return None
    try:
        with open(full) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise CorruptCheckpoint(f"{full}: unreadable checksum manifest ({exc!r})") from exc


def verify_files(path: str, manifest: dict, rank: int = 0, world: int = 1) -> List[str]:
    """Problems found in this rank's share (file i for i % world == rank) of the manifest's files."""
    problems = []
    for name in sorted(manifest["files"])[rank::world]:
        want, full = manifest["files"][name], os.path.join(path, name)
        if not os.path.isfile(full):
            problems.append(f"{full}: missing")
        elif os.path.getsize(full) != want["size"]:
            problems.append(f"{full}: truncated or resized ({os.path.getsize(full)} bytes, {want['size']} written)")
        elif file_crc32(full) != want["crc32"]:
            problems.append(f"{full}: checksum mismatch (the file changed after it was written)")
    return problems


def verify_checkpoint(path: str) -> None:
    """Collective: raise CorruptCheckpoint (naming every bad file) on every rank when any file of
    `path` is missing, truncated or changed; a checkpoint without a manifest (written before
    manifests existed) only needs its metadata.json."""
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise CorruptCheckpoint(f"{path}: no metadata.json (a partial save or not a checkpoint)")
    manifest = read_manifest(path)
    if manifest is None:
        if dist.get_rank() == 0:
            log.warning("%s has no %s (written by an older version): loading it unverified", path, MANIFEST)
        return
    problems = _gather_to_all({dist.get_rank(): verify_files(path, manifest, dist.get_rank(), dist.get_world_size())})
    bad = [p for rank in sorted(problems) for p in problems[rank]]
    if bad:
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt: " + "; ".join(bad))


def iter_dirs(root: str) -> Dict[int, str]:
    if not os.path.isdir(root):
        return {}
    return {int(d[5:]): os.path.join(root, d) for d in os.listdir(root) if d.startswith("iter_") and d[5:].isdigit()}


def _write_order(path: str) -> float:
    """Sort key of a finished checkpoint: the manifest's sequence, else metadata.json's mtime."""
    manifest = read_manifest_quiet(path)
    if manifest is not None and "sequence" in manifest:
        return float(manifest["sequence"])
    meta = os.path.join(path, "metadata.json")
    return -1.0 / (1.0 + os.path.getmtime(meta)) if os.path.isfile(meta) else float("-inf")


def read_manifest_quiet(path: str) -> Optional[dict]:
    try:
        return read_manifest(path)
    except CorruptCheckpoint:
        return None


def _next_sequence(root: str) -> int:
    seqs = [m.get("sequence", 0) for m in map(read_manifest_quiet, iter_dirs(root).values()) if m is not None]
    return max(seqs, default=0) + 1


def complete_checkpoints(root: str) -> List[int]:
    """Steps of `root`'s finished checkpoints (with metadata.json), oldest written first."""
    dirs = {s: p for s, p in iter_dirs(root).items() if os.path.isfile(os.path.join(p, "metadata.json"))}
    return sorted(dirs, key=lambda s: (_write_order(dirs[s]), s))


def prune(root: str, keep_last: int, protect: Sequence[Optional[str]] = ()) -> List[int]:
    """Delete all but the `keep_last` newest-written finished checkpoints, never one in `protect`
    (the tracker's and the loaded one).  Returns the deleted steps."""
    keep = {os.path.realpath(p) for p in protect if p}
    order = complete_checkpoints(root)
    deleted = []
    for step in order[:-keep_last] if keep_last > 0 else []:
        path = iter_dirs(root)[step]
        if os.path.realpath(path) in keep:
            continue
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(step)
    if deleted:
        log.info("pruned checkpoints %s of %s (train.keep_last_checkpoints=%d, newest written kept)",
                 deleted, root, keep_last)
    return deleted
