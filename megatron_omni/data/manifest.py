"""JSONL manifests: one sample per line, validated up front.

    {"id": "cap-0001", "task": "caption", "modality": "image",
     "conversations": [{"role": "user", "content": "<image>images/0001.jpg</image>\\nDescribe the image."},
                       {"role": "assistant", "content": "A red circle on a blue background."}],
     "media": ["images/0001.jpg"], "metadata": {"width": 320}}

* ``conversations`` (chat) or ``text`` (pretraining document; may reference media inline, e.g.
  interleaved image-text); never both.
* DPO rows (task ``dpo``): ``conversations`` ending with a user turn + ``chosen`` / ``rejected``
  assistant answers.
* ``media``: every path referenced in the content, relative to the data root (``data.root``),
  listed once per reference, in order.  Speech answers: ``"audio_codes": [...]`` on an
  assistant turn.  ``metadata`` is free-form (e.g. ``duration`` in seconds).

`read_manifest` checks all of it and raises one `ManifestError` listing every bad line as
``path:line: what is wrong; how to fix``.  Whether media files exist is a separate, slower check
(`check_media`), reported with counts; the loader skips samples whose media fail to decode.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from megatron_omni.data.chat_template import MEDIA_KINDS, Turn, media_refs

__all__ = ["TASKS", "MODALITIES", "ManifestError", "ManifestRow", "MediaCheck", "read_manifest", "check_media"]

TASKS = ("caption", "ocr", "interleaved", "text", "video_qa", "audio_caption", "audio_qa", "asr", "gen_image",
         "speech_gen", "dpo", "instruct", "verifiable_qa")
# The scheduler's unit (paper Sec. 3.1: one modality per mini-batch).
MODALITIES = ("text", "image", "video", "audio")
_KEYS = ("id", "task", "modality", "conversations", "text", "media", "metadata", "chosen", "rejected")
_MAX_LISTED_ERRORS = 20


class ManifestError(ValueError):
    """Invalid manifest content; every line of the message is ``path:line: problem; fix``."""


@dataclass
class ManifestRow:
    id: str
    task: str
    modality: str
    conversations: Optional[List[Turn]] = None
    text: Optional[str] = None
    media: List[str] = field(default_factory=list)
    metadata: Dict[str, Any] = field(default_factory=dict)
    chosen: Optional[str] = None
    rejected: Optional[str] = None
    source: str = ""  # manifest path
    line: int = 0

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def _turns(value: Any) -> List[Turn]:
    if not isinstance(value, list) or not value:
        raise ValueError("'conversations' must be a non-empty list of {role, content} objects")
    turns = []
    for i, t in enumerate(value):
        if not isinstance(t, dict) or not isinstance(t.get("content"), str) or t.get("role") not in (
                "system", "user", "assistant"):
            raise ValueError(f"conversations[{i}] must be {{\"role\": system|user|assistant, \"content\": str}}")
        extra = set(t) - {"role", "content", "audio_codes"}
        if extra:
            raise ValueError(f"conversations[{i}] has unknown key(s) {sorted(extra)}; allowed: role, content, audio_codes")
        codes = t.get("audio_codes")
        if codes is not None:
            if t["role"] != "assistant":
                raise ValueError(f"conversations[{i}]: audio_codes only on assistant turns (speech answers)")
            if not isinstance(codes, list) or not codes or not all(isinstance(c, int) and c >= 0 for c in codes):
                raise ValueError(f"conversations[{i}]: audio_codes must be a non-empty list of ints >= 0")
        if t["role"] == "system" and i != 0:
            raise ValueError(f"conversations[{i}]: a system turn may only come first")
        turns.append(Turn(t["role"], t["content"], codes))
    return turns


def _parse_row(obj: Any) -> ManifestRow:
    """One decoded JSON line -> ManifestRow; ValueError('problem; fix') on anything wrong."""
    if not isinstance(obj, dict):
        raise ValueError("each line must be one JSON object")
    unknown = [k for k in obj if k not in _KEYS]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}; allowed keys: {', '.join(_KEYS)}")
    if not isinstance(obj.get("id"), str) or not obj["id"]:
        raise ValueError("'id' must be a non-empty string")
    if obj.get("task") not in TASKS:
        raise ValueError(f"'task' is {obj.get('task')!r}; use one of {', '.join(TASKS)}")
    if obj.get("modality") not in MODALITIES:
        raise ValueError(f"'modality' is {obj.get('modality')!r}; use one of {', '.join(MODALITIES)}")
    row = ManifestRow(id=obj["id"], task=obj["task"], modality=obj["modality"])
    has_conv, has_text = "conversations" in obj, "text" in obj
    if has_conv == has_text:
        raise ValueError("give exactly one of 'conversations' (chat) or 'text' (pretraining document)")
    if has_text:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise ValueError("'text' must be a non-empty string")
        row.text = obj["text"]
        content = [obj["text"]]
    else:
        row.conversations = _turns(obj["conversations"])
        content = [t.content for t in row.conversations]
        if any(media_refs(t.content) for t in row.conversations if t.role != "user"):
            raise ValueError("media may only be referenced in user turns (or in a 'text' document)")
    if row.task == "dpo":
        if row.conversations is None or row.conversations[-1].role != "user":
            raise ValueError("a dpo row needs 'conversations' ending with the user turn, plus 'chosen' and 'rejected'")
        for key in ("chosen", "rejected"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise ValueError(f"a dpo row needs a non-empty string '{key}' (the {key} assistant answer)")
        row.chosen, row.rejected = obj["chosen"], obj["rejected"]
    else:
        if "chosen" in obj or "rejected" in obj:
            raise ValueError("'chosen' / 'rejected' are only for task 'dpo'")
        if row.conversations is not None and row.conversations[-1].role != "assistant":
            raise ValueError("the last turn must be the assistant's answer (the training target)")
    media = obj.get("media", [])
    if not isinstance(media, list) or not all(isinstance(p, str) and p for p in media):
        raise ValueError("'media' must be a list of relative paths")
    for p in media:
        if os.path.isabs(p) or ".." in p.replace("\\", "/").split("/"):
            raise ValueError(f"media path {p!r} must be relative to data.root, without '..'")
    referenced = [r.path for c in content for r in media_refs(c)]
    if referenced != media:
        raise ValueError(f"'media' {media} must list the referenced media in order, got references {referenced}; "
                         f"write each <image|video|audio>path</...> reference's path into 'media'")
    row.media = media
    metadata = obj.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ValueError("'metadata' must be an object")
    row.metadata = metadata
    return row


def read_manifest(path: str) -> List[ManifestRow]:
    """All rows of a JSONL manifest, or one ManifestError naming every bad line (``path:line: ...``)."""
    if not os.path.isfile(path):
        raise ManifestError(f"{path}: manifest not found; check data.root and the blend's manifest path")
    rows: List[ManifestRow] = []
    errors: List[str] = []
    seen: Dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                errors.append(f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno}); "
                              f"write one JSON object per line")
                continue
            try:
                row = _parse_row(obj)
            except ValueError as err:
                errors.append(f"{path}:{lineno}: {err}")
                continue
            if row.id in seen:
                errors.append(f"{path}:{lineno}: duplicate id {row.id!r} (first on line {seen[row.id]}); ids must be "
                              f"unique within a manifest")
                continue
            seen[row.id] = lineno
            row.source, row.line = path, lineno
            rows.append(row)
    if errors:
        shown = errors[:_MAX_LISTED_ERRORS]
        more = f"\n... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        raise ManifestError(f"{len(errors)} invalid line(s) in {path}:\n" + "\n".join(shown) + more)
    if not rows:
        raise ManifestError(f"{path}: the manifest has no samples; write one JSON object per line, or remove "
                            "its source from the blend")
    return rows


@dataclass
class MediaCheck:
    """Media files that do not exist under the data root, by kind."""

    checked: int
    missing: List[str]  # "manifest:line: path"
    missing_by_kind: Counter

    def summary(self) -> str:
        if not self.missing:
            return f"all {self.checked} media files present"
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.missing_by_kind.items()))
        return (f"{len(self.missing)} of {self.checked} media files missing ({kinds}); first: {self.missing[0]} - "
                f"these samples will be skipped by the loader")


def check_media(rows: List[ManifestRow], root: str) -> MediaCheck:
    """Which referenced media files are missing under `root` (reported, not raised)."""
    missing, by_kind, checked = [], Counter(), 0
    for row in rows:
        contents = [row.text] if row.text is not None else [t.content for t in row.conversations]
        for ref in (r for c in contents for r in media_refs(c)):
            checked += 1
            if not os.path.isfile(os.path.join(root, ref.path)):
                missing.append(f"{row.where}: {ref.path}")
                by_kind[ref.kind if ref.kind in MEDIA_KINDS else "other"] += 1
    return MediaCheck(checked, missing, by_kind)
