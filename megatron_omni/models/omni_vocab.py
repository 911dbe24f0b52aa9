"""The omni vocabulary: text tokens, then the omni special tokens, then discrete audio output codes.

One deterministic layout shared by the model (embedding/output size, which labels are audio
generation targets) and the data side (chat template, placeholder spans):

    [0, text_vocab_size)                       the text tokenizer's own ids
    [text_vocab_size, +len(SPECIAL_TOKENS))    SPECIAL_TOKENS, in this order
    [audio_code_offset, +audio_codebook_size)  audio output codes <|a_0|> ... (CosyVoice-style)

The special tokens are always appended, so the layout (and the parameter count) depends only on
(text_vocab_size, audio_codebook_size), never on which tokenizer files a user has.  A tokenizer
that already owns the chat-template header tokens (Llama-3's ``<|start_header_id|>`` ...) keeps
using its native ids for them (`data/` decides); the appended slots are then simply unused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch

# Paper Fig. 3 template (Llama-3 header tokens), media spans (Sec. 2.1: placeholders replaced by
# encoder outputs, <audio_pad> pads audio spans), caption-as-image-generation (<gen_image>) and
# speech generation markers around the audio output codes.
SPECIAL_TOKENS: Tuple[str, ...] = (
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<image>",
    "</image>",
    "<video>",
    "</video>",
    "<audio>",
    "</audio>",
    "<image_pad>",
    "<video_pad>",
    "<audio_pad>",
    "<gen_image>",
    "</gen_image>",
    "<audio_gen>",
    "</audio_gen>",
)


@dataclass(frozen=True)
class OmniVocab:
    text_vocab_size: int
    audio_codebook_size: int = 4096

    def __post_init__(self):
        if self.text_vocab_size <= 0 or self.audio_codebook_size < 0:
            raise ValueError(f"bad vocabulary sizes: text {self.text_vocab_size}, audio codebook {self.audio_codebook_size}")

    @property
    def special_ids(self) -> Dict[str, int]:
        return {name: self.text_vocab_size + i for i, name in enumerate(SPECIAL_TOKENS)}

    def id(self, name: str) -> int:
        try:
            return self.text_vocab_size + SPECIAL_TOKENS.index(name)
        except ValueError:
            raise KeyError(f"{name!r} is not an omni special token; known: {', '.join(SPECIAL_TOKENS)}") from None

    @property
    def audio_code_offset(self) -> int:
        return self.text_vocab_size + len(SPECIAL_TOKENS)

    @property
    def size(self) -> int:
        """Logical vocabulary size (the model pads it for TP like Megatron-LM)."""
        return self.audio_code_offset + self.audio_codebook_size

    def audio_code_id(self, code: int) -> int:
        if not 0 <= code < self.audio_codebook_size:
            raise ValueError(f"audio code {code} outside the codebook [0, {self.audio_codebook_size})")
        return self.audio_code_offset + code

    def is_audio_generation_target(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels whose loss is the audio-generation loss L_gen_a (Fig. 4): the codes and the
        end-of-speech marker that closes them."""
        codes = (labels >= self.audio_code_offset) & (labels < self.size)
        return codes | (labels == self.id("</audio_gen>"))

    # Convenience ids used by the model and by the M-RoPE position function.
    @property
    def image_pad_id(self) -> int:
        return self.id("<image_pad>")

    @property
    def video_pad_id(self) -> int:
        return self.id("<video_pad>")

    @property
    def audio_pad_id(self) -> int:
        return self.id("<audio_pad>")

    @property
    def placeholder_ids(self) -> tuple:
        """(<image_pad>, <video_pad>, <audio_pad>): the slots the encoders' tokens fill."""
        return self.image_pad_id, self.video_pad_id, self.audio_pad_id
