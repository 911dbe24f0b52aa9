"""Mock omni microbatches (Megatron-LM's ``--mock-data`` for the omni model): random tokens and media
with exactly the structure real data has, for smoke runs, parallel-equivalence tests and benchmarks.

Every row is packed: samples follow each other until the row is full (the last one is text
filler), each sample's M-RoPE positions restart at 0.  Media spans are expanded with the model's
own token-count functions (`merged_token_counts`, `audio_token_count`), so a mock microbatch
exercises the same placeholder replacement as a real one.  Deterministic in (seed, dp_rank,
modality, index): any rank layout sees the same microbatch sequence for a given DP rank.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from megatron_omni.config.schema import OmniConfig
from megatron_omni.data.omni_batch import OmniMicrobatch
from megatron_omni.config.encoders import audio_token_count
from megatron_omni.models.omni_vocab import OmniVocab
from megatron_omni.models.rope import mrope_position_ids

MODALITIES = ("text", "image", "video", "audio", "audio_gen", "preference")


def mock_sample_id(modality: str, dp_rank: int, index, row: int) -> str:
    """Row `row` of DP rank `dp_rank`'s `index`-th (0-based) training microbatch of `modality`."""
    return f"mock:{modality}/dp{dp_rank}/{index}/row{row}"


@dataclass
class _Sample:
    tokens: List[int]
    targets: List[bool]  # loss on the *next* token
    grids: List[List[int]]
    video_grids: List[List[int]]
    audio_frames: List[int]


class MockOmniData:
    """`next_microbatch(modality)` -> OmniMicrobatch [micro_batch_size, seq_length] for this DP rank
    (an `OmniSource`, data/omni_source.py).

    With `preference` (alignment-tuning runs, `dpo` configured) there is a "preference" stream too:
    each row starts with a chosen and a rejected sample of the same prompt (an image question when
    the model has vision), the layout `data/preference_stream.py` packs real DPO pairs in."""

    def __init__(self, omni: OmniConfig, vocab: OmniVocab, *, seq_length: int, micro_batch_size: int,
                 seed: int, dp_rank: int = 0, preference: bool = False):
        self.omni, self.vocab, self.preference = omni, vocab, preference
        self.seq_length, self.micro_batch_size = seq_length, micro_batch_size
        self.seed, self.dp_rank = seed, dp_rank
        self.consumed: Dict[str, int] = {m: 0 for m in MODALITIES}
        self.skipped_samples = 0

    @property
    def modalities(self) -> List[str]:
        out = ["text"]
        if self.omni.vision is not None:
            out += ["image", "video"]
        if self.omni.audio is not None:
            out += ["audio"]
        if self.omni.audio_codebook_size:
            out += ["audio_gen"]
        if self.preference:
            out += ["preference"]
        return out

    # Generated microbatches are never unusable and need no background threads.
    def skipped_by_modality(self) -> Dict[str, int]:
        return {}

    def bad_samples(self) -> Dict[str, int]:
        return {}

    def pause_prefetch(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {"consumed": dict(self.consumed)}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = dict(state["consumed"])

    # ---------------------------------------------------------------- generation

    def _text(self, gen: torch.Generator, n: int) -> List[int]:
        return torch.randint(0, self.vocab.text_vocab_size, (n,), generator=gen).tolist()

    def _sample(self, modality: str, gen: torch.Generator, room: int) -> Optional[_Sample]:
        """One sample of at most `room` tokens, or None when the modality's smallest one does not fit."""
        v = self.vocab
        prompt = self._text(gen, int(torch.randint(2, 6, (1,), generator=gen)))
        answer = self._text(gen, int(torch.randint(2, 8, (1,), generator=gen)))
        span: List[int] = []
        grids, video_grids, frames = [], [], []
        if modality in ("image", "video"):
            m = self.omni.vision.spatial_merge_size
            h, w = (int(x) * m for x in torch.randint(1, 3, (2,), generator=gen))
            t = 1 if modality == "image" else 2
            (grids if modality == "image" else video_grids).append([t, h, w])
            pad = v.image_pad_id if modality == "image" else v.video_pad_id
            open_, close = ("<image>", "</image>") if modality == "image" else ("<video>", "</video>")
            span = [v.id(open_)] + [pad] * (t * h * w // (m * m)) + [v.id(close)]
        elif modality == "audio":
            n = int(torch.randint(8, 40, (1,), generator=gen))
            frames.append(n)
            span = [v.id("<audio>")] + [v.audio_pad_id] * int(audio_token_count(n, self.omni.audio)) + [v.id("</audio>")]
        elif modality == "audio_gen":  # speech tokens as output (Sec. 2.1 "Audio Decoder")
            codes = torch.randint(0, v.audio_codebook_size, (int(torch.randint(3, 10, (1,), generator=gen)),),
                                  generator=gen)
            answer = [v.id("<audio_gen>")] + [v.audio_code_id(int(c)) for c in codes] + [v.id("</audio_gen>")]
        header = [v.id("<|start_header_id|>")]
        user = header + span + prompt + [v.id("<|eot_id|>")]
        reply = header + answer + [v.id("<|eot_id|>")]
        if modality == "text":  # pretraining text: every next token is a target
            tokens = self._text(gen, min(room, int(torch.randint(8, 40, (1,), generator=gen))))
            return _Sample(tokens, [True] * (len(tokens) - 1) + [False], [], [], [])
        tokens = user + reply
        if len(tokens) > room:
            return None
        # Eq. 1: only the assistant's answer (after its header) is predicted.
        targets = [False] * len(user) + [True] * (len(reply) - 1) + [False]
        return _Sample(tokens, targets, grids, video_grids, frames)

    def _pair(self, gen: torch.Generator, room: int) -> List[_Sample]:
        """(chosen, rejected): one prompt, two different replies; [] when the pair does not fit."""
        chosen = self._sample("image" if self.omni.vision is not None else "audio_gen", gen, room // 2)
        if chosen is None:
            return []
        user = chosen.targets.index(True)  # the reply's header is the first position with a target
        v = self.vocab
        reply = [v.id("<|start_header_id|>")] + self._text(gen, int(torch.randint(2, 8, (1,), generator=gen))) + \
            [v.id("<|eot_id|>")]
        rejected = _Sample(chosen.tokens[:user] + reply, [False] * user + [True] * (len(reply) - 1) + [False],
                           list(chosen.grids), [], [])
        return [chosen, rejected] if len(chosen.tokens) + len(rejected.tokens) <= room else []

    def validation_microbatches(self, modality: str, count: int = 2) -> List[OmniMicrobatch]:
        """A fixed held-out set per modality (its own generator stream, never drawn for training)."""
        return [self._microbatch(modality, f"val{i}") for i in range(count)]

    def next_microbatch(self, modality: str) -> OmniMicrobatch:
        if modality not in self.modalities:
            raise ValueError(f"mock data has no modality {modality!r}; configured: {self.modalities}")
        index = self.consumed[modality]
        self.consumed[modality] += 1
        return self._microbatch(modality, index)

    def _microbatch(self, modality: str, index) -> OmniMicrobatch:
        gen = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{self.dp_rank}:{modality}:{index}".encode()))
        B, S = self.micro_batch_size, self.seq_length
        tokens = torch.zeros(B, S, dtype=torch.long)
        labels = torch.zeros(B, S, dtype=torch.long)
        loss_mask = torch.zeros(B, S)
        positions = torch.zeros(3, B, S, dtype=torch.long)
        bounds, grids, video_grids, frames = [0], [], [], []
        for b in range(B):
            pos = 0
            pair = self._pair(gen, S) if modality == "preference" else []
            while pos < S:
                room = S - pos
                if modality == "preference":
                    sample = pair.pop(0) if pair else None
                else:
                    sample = self._sample(modality, gen, room) if pos == 0 or room > S // 4 else None
                if sample is None:  # text filler closes the row
                    sample = self._sample("text", gen, room)
                    sample = _Sample(sample.tokens + self._text(gen, room - len(sample.tokens)),
                                     [True] * (room - 1) + [False], [], [], [])
                n = len(sample.tokens)
                ids = torch.tensor(sample.tokens)
                tokens[b, pos:pos + n] = ids
                labels[b, pos:pos + n - 1] = ids[1:]
                loss_mask[b, pos:pos + n] = torch.tensor(sample.targets, dtype=torch.float)
                m = self.omni.vision.spatial_merge_size if self.omni.vision is not None else 2
                p, _ = mrope_position_ids(
                    ids[None], torch.tensor(sample.grids) if sample.grids else None,
                    torch.tensor(sample.video_grids) if sample.video_grids else None,
                    image_token_id=self.vocab.image_pad_id, video_token_id=self.vocab.video_pad_id,
                    spatial_merge_size=m)
                positions[:, b, pos:pos + n] = p[:, 0]
                grids += sample.grids
                video_grids += sample.video_grids
                frames += sample.audio_frames
                pos += n
                bounds.append(b * S + pos)
        # one id per row (its samples are drawn together): what the loss-spike log names
        batch = OmniMicrobatch(tokens=tokens, labels=labels, loss_mask=loss_mask, position_ids=positions,
                               cu_seqlens=torch.tensor(bounds, dtype=torch.int32), modality=modality,
                               sample_ids=[[mock_sample_id(modality, self.dp_rank, index, b)] for b in range(B)])
        if grids or video_grids:
            patch_dim = self.omni.vision.patch_dim
            for kind, g in (("", grids), ("_videos", video_grids)):
                if g:
                    grid = torch.tensor(g)
                    setattr(batch, "pixel_values" + kind, torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=gen))
                    setattr(batch, "image_grid_thw" if not kind else "video_grid_thw", grid)
        if frames:
            feats = torch.zeros(len(frames), max(frames), self.omni.audio.num_mel_bins)
            for i, n in enumerate(frames):
                feats[i, :n] = torch.randn(n, self.omni.audio.num_mel_bins, generator=gen)
            batch.audio_features, batch.audio_lengths = feats, torch.tensor(frames)
        return batch
