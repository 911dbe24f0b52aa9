"""Synthetic `OmniSample`s with a realistic length mix, for packing tests and benchmarks.

Lengths follow what the model would see on M2-omni's pre-training data (paper Sec. 2.2, Tab. 2:
at most 320 image tokens in pre-training, 8 video frames in stage 3) with a 2x2 NaViT merge and
the Whisper-style audio rule (`audio_token_count`: 100 fbank frames/s -> 12.5 tokens/s):

    modality     medium                                   text tokens (log-normal, median / sigma)
    text         --                                        350 / 1.0   (truncated at the row)
    image        1 image, 16..36 x 16..36 patches (<=320 t)   30 / 0.6   caption / OCR line
    interleaved  2..4 images as above                         250 / 0.7
    video        8 frames (4 temporal patches), 12..20^2 p.    40 / 0.6
    audio        1..30 s clip (12..375 tokens)                 45 / 0.6   transcript

Every sample is laid out like the chat template does: ``<|begin_of_text|>``, text, media as
``<image>`` + ``<image_pad>`` x t*h*w/4 + ``</image>`` (etc.), text, ``<|eot_id|>``; loss on the
text after the first medium.  Media tensors are small (``patch_dim`` features) and filled with
per-sample random values, so tests can tell whose pixels landed where.  Position ids are
``arange`` on all three axes: the packer copies them verbatim, their M-RoPE values do not matter
to it.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from megatron_omni.data.omni_batch import OmniSample
from megatron_omni.config.encoders import AudioConfig, audio_token_count
from megatron_omni.models.omni_vocab import OmniVocab

__all__ = ["MODALITIES", "SyntheticSource", "synthetic_sample"]

MODALITIES = ("text", "image", "interleaved", "video", "audio")
SPATIAL_MERGE = 2  # NaViT 2x2 token merge (paper Sec. 2.1)
MAX_IMAGE_TOKENS = 320  # Tab. 2, pre-training
VIDEO_FRAMES = 8  # Tab. 2, pre-training stage 3
TEMPORAL_PATCH = 2  # Qwen2-VL: 2 frames per temporal patch
FBANK_FRAMES_PER_S = 100

_TEXT_MEDIAN_SIGMA = {"text": (350, 1.0), "image": (30, 0.6), "interleaved": (250, 0.7), "video": (40, 0.6),
                      "audio": (45, 0.6)}


def _text_len(rng: random.Random, modality: str, cap: int) -> int:
    median, sigma = _TEXT_MEDIAN_SIGMA[modality]
    return max(2, min(cap, int(rng.lognormvariate(math.log(median), sigma))))


def _image_grid(rng: random.Random) -> Tuple[int, int, int]:
    while True:  # even patch counts (2x2 merge), <= MAX_IMAGE_TOKENS after merging
        h, w = 2 * rng.randint(8, 18), 2 * rng.randint(8, 18)
        if h * w // SPATIAL_MERGE ** 2 <= MAX_IMAGE_TOKENS:
            return 1, h, w


class _Builder:
    def __init__(self, vocab: OmniVocab, rng: random.Random, patch_dim: int, mel_bins: int):
        self.vocab, self.rng = vocab, rng
        self.patch_dim, self.mel_bins = patch_dim, mel_bins
        self.ids: List[int] = [vocab.id("<|begin_of_text|>")]
        self.target: List[bool] = [False]
        self.images: List[Tuple[Tuple[int, int, int], torch.Tensor]] = []
        self.videos: List[Tuple[Tuple[int, int, int], torch.Tensor]] = []
        self.audio: List[torch.Tensor] = []
        self.seen_medium = False

    def text(self, n: int) -> None:
        self.ids += [self.rng.randrange(self.vocab.text_vocab_size) for _ in range(n)]
        self.target += [self.seen_medium] * n

    def _span(self, kind: str, n: int) -> None:
        self.ids += [self.vocab.id(f"<{kind}>")] + [self.vocab.id(f"<{kind}_pad>")] * n + [self.vocab.id(f"</{kind}>")]
        self.target += [False] * (n + 2)
        self.seen_medium = True

    def _pixels(self, grid: Tuple[int, int, int]) -> torch.Tensor:
        t, h, w = grid
        return torch.full((t * h * w, self.patch_dim), self.rng.random()) + torch.arange(self.patch_dim) * 1e-3

    def image(self, grid: Tuple[int, int, int]) -> None:
        self.images.append((grid, self._pixels(grid)))
        self._span("image", grid[0] * grid[1] * grid[2] // SPATIAL_MERGE ** 2)

    def video(self, grid: Tuple[int, int, int]) -> None:
        self.videos.append((grid, self._pixels(grid)))
        self._span("video", grid[0] * grid[1] * grid[2] // SPATIAL_MERGE ** 2)

    def clip(self, frames: int, audio_config: AudioConfig) -> None:
        self.audio.append(torch.full((frames, self.mel_bins), self.rng.random()))
        self._span("audio", audio_token_count(frames, audio_config))

    def build(self, modality: str, sample_id: str) -> OmniSample:
        self.ids.append(self.vocab.id("<|eot_id|>"))
        self.target.append(True)
        ids = torch.tensor(self.ids, dtype=torch.int64)
        n = ids.numel()
        # labels[i] = token i+1 (the next-token target); the last position has none.
        labels = torch.cat([ids[1:], torch.zeros(1, dtype=torch.int64)])
        loss_mask = torch.tensor(self.target[1:] + [False], dtype=torch.float32)
        media: Dict[str, Optional[torch.Tensor]] = {}
        if self.images:
            media["image_grid_thw"] = torch.tensor([g for g, _ in self.images], dtype=torch.int64)
            media["pixel_values"] = torch.cat([p for _, p in self.images])
        if self.videos:
            media["video_grid_thw"] = torch.tensor([g for g, _ in self.videos], dtype=torch.int64)
            media["pixel_values_videos"] = torch.cat([p for _, p in self.videos])
        if self.audio:
            frames = max(a.shape[0] for a in self.audio)
            media["audio_features"] = torch.stack(
                [torch.nn.functional.pad(a, (0, 0, 0, frames - a.shape[0])) for a in self.audio])
            media["audio_lengths"] = torch.tensor([a.shape[0] for a in self.audio], dtype=torch.int64)
        return OmniSample(tokens=ids, labels=labels, loss_mask=loss_mask,
                          position_ids=torch.arange(n).expand(3, n).clone(), modality=modality,
                          sample_id=sample_id, **media)


def synthetic_sample(
    modality: str,
    rng: random.Random,
    vocab: OmniVocab,
    *,
    seq_length: int = 4096,
    patch_dim: int = 4,
    mel_bins: int = 4,
    audio_config: Optional[AudioConfig] = None,
    sample_id: str = "",
) -> OmniSample:
    """One sample of `modality` (see the module doc for the length mix)."""
    if modality not in MODALITIES:
        raise ValueError(f"unknown synthetic modality {modality!r}; one of {MODALITIES}")
    audio_config = audio_config or AudioConfig()
    b = _Builder(vocab, rng, patch_dim, mel_bins)
    if modality == "text":
        b.text(_text_len(rng, "text", seq_length))
    elif modality == "image":
        b.text(rng.randint(3, 12))  # the user turn's prompt
        b.image(_image_grid(rng))
        b.text(_text_len(rng, "image", seq_length // 4))
    elif modality == "interleaved":
        for _ in range(rng.randint(2, 4)):
            b.text(_text_len(rng, "interleaved", seq_length // 8) // 2)
            b.image(_image_grid(rng))
        b.text(_text_len(rng, "interleaved", seq_length // 8))
    elif modality == "video":
        b.text(rng.randint(3, 12))
        side = 2 * rng.randint(6, 10)
        b.video((VIDEO_FRAMES // TEMPORAL_PATCH, side, 2 * rng.randint(6, 10)))
        b.text(_text_len(rng, "video", seq_length // 4))
    else:
        b.text(rng.randint(3, 12))
        b.clip(int(rng.uniform(1.0, 30.0) * FBANK_FRAMES_PER_S), audio_config)
        b.text(_text_len(rng, "audio", seq_length // 4))
    return b.build(modality, sample_id)


class SyntheticSource:
    """A `SampleSource` of `size` synthetic samples of one modality; sample i is a pure function of
    (seed, i).  `fail(i)` -> True makes index i raise `error(path)` (a corrupt-media stand-in)."""

    def __init__(
        self,
        modality: str,
        size: int,
        *,
        vocab: OmniVocab,
        seed: int = 0,
        seq_length: int = 4096,
        fail: Callable[[int], bool] = lambda i: False,
        error: Callable[[str], BaseException] = OSError,
        **sample_kwargs,
    ):
        self.modality, self.size, self.vocab, self.seed = modality, size, vocab, seed
        self.seq_length, self.fail, self.error = seq_length, fail, error
        self.sample_kwargs = sample_kwargs
        self.calls = 0

    def __len__(self) -> int:
        return self.size

    def describe(self, index: int) -> str:
        return f"synthetic://{self.modality}/{index}.bin"

    def __getitem__(self, index: int) -> OmniSample:
        self.calls += 1
        if not 0 <= index < self.size:
            raise IndexError(index)
        if self.fail(index):
            raise self.error(self.describe(index))
        rng = random.Random(f"{self.seed}/{self.modality}/{index}")
        return synthetic_sample(self.modality, rng, self.vocab, seq_length=self.seq_length,
                                sample_id=f"{self.modality}:{index}", **self.sample_kwargs)

    def samples(self, indices: Iterable[int]) -> List[OmniSample]:
        return [self[i] for i in indices]
