"""User-facing prompts -> token ids + media, and answers -> text, with the training data path's rules.

An omni checkpoint answers in the M2-omni chat template (`ChatTemplate.render_prompt`: system, user
turn with its media spans, assistant header); media are decoded by the training loader's
`decode_media`, so placeholder counts, patch layout and fbank features are exactly training's.
A text-only Llama checkpoint continues ``<bos> + text``.  Stop tokens: the tokenizer's EOS, and
``<|eot_id|>`` (which closes every assistant turn) for the omni model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from megatron_omni.config.schema import RunConfig
from megatron_omni.data.chat_template import ChatTemplate, Turn
from megatron_omni.data.manifest import ManifestRow
from megatron_omni.inference.prompts import PromptMedia

__all__ = ["ChatPrompts", "MediaLimits"]


@dataclass
class MediaLimits:
    """Per-medium token budgets (the stage blend's Table 2 limits; the loader's defaults)."""

    max_image_tokens: int = 320
    max_video_frames: Optional[int] = 16
    max_video_tokens: Optional[int] = None


class ChatPrompts:
    """Builds prompts for one checkpoint's tokenizer and vocabulary (`cfg` from `load.inference_config`)."""

    def __init__(self, cfg: RunConfig, limits: Optional[MediaLimits] = None):
        from megatron_omni.data.tokenizer import build_tokenizer

        self.cfg = cfg
        self.limits = limits or MediaLimits()
        kind, path = cfg.data.tokenizer_type, cfg.data.tokenizer_model
        if kind in ("sentencepiece", "huggingface") and not path:
            raise ValueError("this checkpoint names no tokenizer (data.tokenizer_model is unset, e.g. a converted "
                             "checkpoint): pass data.tokenizer_type=... data.tokenizer_model=PATH, or give token ids "
                             "with --prompt-ids")
        self.tokenizer = build_tokenizer(cfg.data, vocab_size=cfg.model.vocab_size)
        self.template = None
        self.vocab = None
        if cfg.omni is not None:
            from megatron_omni.models.omni import omni_vocab

            self.vocab = omni_vocab(cfg.model, cfg.omni)
            self.template = ChatTemplate(self.tokenizer, self.vocab)

    # ------------------------------------------------------------------ ids

    @property
    def eos_id(self) -> int:
        tok = self.tokenizer
        return int(tok.eos_id) if hasattr(tok, "eos_id") else int(tok.eod)

    @property
    def stop_ids(self) -> List[int]:
        ids = [self.eos_id]
        if self.template is not None:
            ids.append(self.template.special("<|eot_id|>"))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids, cut at the first stop token; omni specials / audio codes by name."""
        stop = set(self.stop_ids)
        text_vocab = self.tokenizer.vocab_size
        names = {v: k for k, v in self.vocab.special_ids.items()} if self.vocab is not None else {}
        pieces, run = [], []
        for t in ids:
            t = int(t)
            if t in stop:
                break
            if t < text_vocab:
                run.append(t)
                continue
            if run:
                pieces.append(self.tokenizer.decode(run))
                run = []
            if t in names:
                pieces.append(names[t])
            elif self.vocab is not None and t >= self.vocab.audio_code_offset:
                pieces.append(f"<|a_{t - self.vocab.audio_code_offset}|>")
        if run:
            pieces.append(self.tokenizer.decode(run))
        return "".join(pieces)

    # ------------------------------------------------------------------ prompts

    def from_row(self, row: ManifestRow, root: str) -> Tuple[List[int], Optional[PromptMedia]]:
        """A manifest row's prompt: its turns up to (not including) the final assistant answer."""
        if self.template is None:
            if row.text is None and row.conversations is None:
                raise ValueError(f"{row.where} ({row.id}): empty row")
            text = row.text if row.text is not None else "\n".join(
                t.content for t in row.conversations if t.role != "assistant")
            return [self._bos()] + self.tokenizer.encode(text), None
        from megatron_omni.data.sample_builder import decode_media

        if row.conversations is None:
            raise ValueError(f"{row.where} ({row.id}): a 'text' document has no question to answer; the manifest "
                             "needs 'conversations' rows")
        turns = list(row.conversations)
        if turns and turns[-1].role == "assistant":
            turns = turns[:-1]
        if not turns or turns[-1].role != "user":
            raise ValueError(f"{row.where} ({row.id}): the prompt must end with a user turn")
        lim = self.limits
        media = decode_media(row, root=root, vision=self.cfg.omni.vision, audio=self.cfg.omni.audio,
                             max_image_tokens=lim.max_image_tokens, max_video_frames=lim.max_video_frames,
                             max_video_tokens=lim.max_video_tokens)
        rendered = self.template.render_prompt(turns, media.token_counts)
        fields = media.sample_fields()
        return list(rendered.tokens), PromptMedia(**fields) if fields else None

    def from_text(self, text: str, *, images: Sequence[str] = (), videos: Sequence[str] = (),
                  audios: Sequence[str] = ()) -> Tuple[List[int], Optional[PromptMedia]]:
        """A user question with media files (paths as given: absolute or relative to the cwd)."""
        files = [("image", p) for p in images] + [("video", p) for p in videos] + [("audio", p) for p in audios]
        if files and self.template is None:
            raise ValueError("media prompts need an omni checkpoint; this one is a text-only Llama")
        for _, p in files:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p}: media file not found")
        content = "".join(f"<{kind}>{os.path.abspath(p)}</{kind}>\n" for kind, p in files) + text
        row = ManifestRow(id="prompt", task="instruct", modality=files[0][0] if files else "text",
                          conversations=[Turn("user", content)], media=[os.path.abspath(p) for _, p in files],
                          source="--prompt")
        if self.template is None:
            return [self._bos()] + self.tokenizer.encode(text), None
        return self.from_row(row, root="/")

    def _bos(self) -> int:
        tok = self.tokenizer
        return int(tok.bos_id) if hasattr(tok, "bos_id") else int(tok.bos)
