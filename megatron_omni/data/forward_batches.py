"""Inputs of a forward-only omni pass (tools/forward.py) as `OmniMicrobatch`es, the form the
training step feeds the model: token-id rows (text only: M-RoPE ids t = h = w = position, causal
per row) or one manifest row built by the real sample builder (media decoded, chat template,
placeholder runs, M-RoPE ids), so that a checkpoint can be run on exactly what it trains on."""

from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch

from megatron_omni.data.manifest import ManifestError, ManifestRow, read_manifest
from megatron_omni.data.omni_batch import OmniMicrobatch
from megatron_omni.data.packing import collate_rows
from megatron_omni.data.sample_builder import build_sample
from megatron_omni.data.tokenizer import ChatTokenizer
from megatron_omni.config.encoders import AudioConfig, VisionConfig
from megatron_omni.models.omni_vocab import OmniVocab


def text_microbatches(ids: np.ndarray, micro_batch_size: int) -> List[OmniMicrobatch]:
    """int [B, S] token ids -> B / micro_batch_size microbatches, each row its own causal sequence."""
    batch, seq = ids.shape
    out = []
    for i in range(0, batch, micro_batch_size):
        tokens = torch.from_numpy(ids[i:i + micro_batch_size].astype(np.int64))
        b = tokens.shape[0]
        out.append(OmniMicrobatch(
            tokens=tokens, labels=torch.zeros_like(tokens), loss_mask=torch.zeros(b, seq),
            position_ids=torch.arange(seq).expand(3, b, seq).contiguous(),
            cu_seqlens=torch.arange(0, b * seq + 1, seq, dtype=torch.int32)))
    return out


def manifest_row(path: str, line: int) -> ManifestRow:
    """The sample on line `line` (1-based, as in `path:line` error messages) of a JSONL manifest."""
    rows = read_manifest(path)
    for row in rows:
        if row.line == line:
            return row
    raise ManifestError(f"{path}:{line}: no sample on that line; lines with samples: "
                        f"{rows[0].line}..{rows[-1].line} ({len(rows)} samples)")


def manifest_microbatch(path: str, line: int, *, root: str, tokenizer: ChatTokenizer, vocab: OmniVocab,
                        vision: VisionConfig, audio: AudioConfig, max_image_tokens: int,
                        max_video_frames: Optional[int]) -> OmniMicrobatch:
    """One manifest row (media under `root`) as a one-sample microbatch of its own length."""
    sample = build_sample(manifest_row(path, line), root=root, tokenizer=tokenizer, vocab=vocab, vision=vision,
                          audio=audio, max_image_tokens=max_image_tokens, max_video_frames=max_video_frames)
    return collate_rows([[sample]], len(sample))
