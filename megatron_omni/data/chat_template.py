"""The M2-omni chat template (paper Fig. 3) rendered straight to token ids, with loss targets.

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n<image>image.jpg</image>\\n{question}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{answer} <gen_image>{caption}</gen_image><|eot_id|> ...

(one line here, wrapped for reading).  Fig. 3 draws Llama-3's tokens as ``<start_header_id>`` ...
and shows a space before each ``</eot_id>``; we emit the real Llama-3 tokens and Llama-3's own
layout (turn content stripped, nothing between it and ``<|eot_id|>``), so a Llama-3 instruct
checkpoint sees exactly the format it was trained on.

Media references in turn content (``<image>rel/path.jpg</image>``, ``<video>…</video>``,
``<audio>…</audio>``) become ``<image>`` + ``<image_pad>`` x n + ``</image>``, n given by the
caller from the decoded medium (`sample_builder` computes it with the model's own functions).
A speech answer (``audio_codes`` on an assistant turn) appends ``<audio_gen>`` + codes +
``</audio_gen>`` to that turn's text.

Targets (what the loss sees, paper Eq. 1 restricted to answers): every assistant-turn token -
answer text, ``<gen_image>`` spans, speech codes - and the turn's closing ``<|eot_id|>``.
System, user, headers and media spans are never targets.  Pure-text documents (`render_document`)
have every token but the first as a target, except media spans inside interleaved documents.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from megatron_omni.data.tokenizer import ChatTokenizer
from megatron_omni.models.omni_vocab import OmniVocab

__all__ = [
    "DEFAULT_SYSTEM_PROMPT", "MEDIA_KINDS", "MediaRef", "Rendered", "ChatTemplate", "Turn", "media_refs",
    "TemplateError",
]

# Paper Fig. 3 system prompt.
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language, vision and audio assistant. You are able to understand the visual and audio "
    "content that the user provides, and assist the user with a variety of tasks using natural language."
)

MEDIA_KINDS = ("image", "video", "audio")
_MEDIA_REF = re.compile(r"<(image|video|audio)>(.*?)</\1>", re.S)
# Literal markers that stay single tokens inside assistant text (caption-as-image-generation).
_GEN_IMAGE = re.compile(r"(<gen_image>|</gen_image>)")


class TemplateError(ValueError):
    """A conversation the template cannot render (the message names the turn and the fix)."""


@dataclass(frozen=True)
class MediaRef:
    kind: str  # image | video | audio
    path: str  # as written in the content (relative to the data root)


@dataclass
class Turn:
    role: str  # system | user | assistant
    content: str
    audio_codes: Optional[List[int]] = None  # speech answer: discrete codes (assistant only)


@dataclass
class Rendered:
    """Token ids and, per token, whether it is a loss target; media in token order."""

    tokens: List[int] = field(default_factory=list)
    is_target: List[bool] = field(default_factory=list)
    media: List[MediaRef] = field(default_factory=list)

    def add(self, ids: Sequence[int], target: bool) -> None:
        self.tokens.extend(ids)
        self.is_target.extend([target] * len(ids))

    def labels_and_loss_mask(self):
        """Next-token labels and the mask (1 where the *label* is a target); last label masked."""
        labels = self.tokens[1:] + [0]
        loss_mask = [1.0 if t else 0.0 for t in self.is_target[1:]] + [0.0]
        return labels, loss_mask


def media_refs(text: str) -> List[MediaRef]:
    """Media referenced in `text`, in order."""
    return [MediaRef(m.group(1), m.group(2).strip()) for m in _MEDIA_REF.finditer(text)]


class ChatTemplate:
    """Renders conversations / documents for one tokenizer + omni vocabulary.

    A special token uses the tokenizer's native id when it has one (Llama-3's header tokens),
    otherwise the `OmniVocab` slot after the text vocabulary.
    """

    def __init__(self, tokenizer: ChatTokenizer, vocab: OmniVocab, system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT):
        if tokenizer.vocab_size != vocab.text_vocab_size:
            raise TemplateError(
                f"tokenizer has {tokenizer.vocab_size} text tokens but OmniVocab.text_vocab_size is "
                f"{vocab.text_vocab_size}; build the vocabulary as OmniVocab(tokenizer.vocab_size, ...)"
            )
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.system_prompt = system_prompt
        self._nl2 = tokenizer.encode("\n\n")
        self._role_ids = {role: tokenizer.encode(role) for role in ("system", "user", "assistant")}

    def special(self, name: str) -> int:
        native = self.tokenizer.special_id(name)
        return native if native is not None else self.vocab.id(name)

    # -- pieces -------------------------------------------------------------------------------

    def _header(self, out: Rendered, role: str) -> None:
        out.add([self.special("<|start_header_id|>")] + self._role_ids[role] + [self.special("<|end_header_id|>")]
                + self._nl2, target=False)

    def _media_span(self, out: Rendered, ref: MediaRef, num_tokens: int) -> None:
        if num_tokens <= 0:
            raise TemplateError(f"{ref.kind} {ref.path!r} yields {num_tokens} tokens; a medium needs at least one")
        pad = self.vocab.id(f"<{ref.kind}_pad>")
        out.add([self.vocab.id(f"<{ref.kind}>")] + [pad] * num_tokens + [self.vocab.id(f"</{ref.kind}>")], target=False)
        out.media.append(ref)

    def _text_with_media(self, out: Rendered, text: str, media_tokens: List[int], target: bool) -> None:
        """`text` with its media references expanded (media never targets); consumes media_tokens."""
        pos = 0
        for m in _MEDIA_REF.finditer(text):
            self._text(out, text[pos:m.start()], target)
            if not media_tokens:
                raise TemplateError(f"no token count given for {m.group(0)!r}: pass one count per media reference")
            self._media_span(out, MediaRef(m.group(1), m.group(2).strip()), media_tokens.pop(0))
            pos = m.end()
        self._text(out, text[pos:], target)

    def _text(self, out: Rendered, text: str, target: bool) -> None:
        if text:
            out.add(self.tokenizer.encode(text), target)

    def _answer(self, out: Rendered, turn: Turn, where: str) -> None:
        if _MEDIA_REF.search(turn.content):
            raise TemplateError(f"{where}: assistant turns cannot reference input media; move it to a user turn")
        for piece in _GEN_IMAGE.split(turn.content.strip()):
            if piece in ("<gen_image>", "</gen_image>"):
                out.add([self.vocab.id(piece)], target=True)
            else:
                self._text(out, piece, target=True)
        if turn.audio_codes:
            codes = [self.vocab.audio_code_id(int(c)) for c in turn.audio_codes]
            out.add([self.vocab.id("<audio_gen>")] + codes + [self.vocab.id("</audio_gen>")], target=True)
        out.add([self.special("<|eot_id|>")], target=True)

    # -- whole samples --------------------------------------------------------------------------

    def render(self, turns: Sequence[Turn], media_tokens: Sequence[int] = ()) -> Rendered:
        """A conversation.  `media_tokens[i]` = encoder tokens of the i-th media reference (in order).

        A leading system turn replaces the default system prompt; with ``system_prompt=None`` and
        no system turn the system block is omitted.
        """
        counts = list(media_tokens)
        out = Rendered()
        out.add([self.special("<|begin_of_text|>")], target=False)
        turns = list(turns)
        system = self.system_prompt
        if turns and turns[0].role == "system":
            system = turns.pop(0).content
        if system is not None:
            self._header(out, "system")
            self._text(out, system.strip(), target=False)
            out.add([self.special("<|eot_id|>")], target=False)
        for i, turn in enumerate(turns):
            where = f"turn {i} ({turn.role})"
            if turn.role not in ("user", "assistant"):
                raise TemplateError(f"{where}: role must be user or assistant here (system only comes first)")
            self._header(out, turn.role)
            if turn.role == "assistant":
                self._answer(out, turn, where)
            else:
                if turn.audio_codes:
                    raise TemplateError(f"{where}: audio_codes belong on assistant turns (speech answers)")
                self._text_with_media(out, turn.content.strip(), counts, target=False)
                out.add([self.special("<|eot_id|>")], target=False)
        if counts:
            raise TemplateError(f"{len(counts)} media token counts left over: pass one per media reference")
        return out

    def render_prompt(self, turns: Sequence[Turn], media_tokens: Sequence[int] = ()) -> Rendered:
        """A conversation ending with a user turn, plus the assistant header (generation prompt)."""
        out = self.render(turns, media_tokens)
        self._header(out, "assistant")
        return out

    def render_document(self, text: str, media_tokens: Sequence[int] = ()) -> Rendered:
        """Pretraining text (plain or interleaved image-text): ``<|begin_of_text|> text <eos>``,
        every token after the first a target except media spans."""
        counts = list(media_tokens)
        out = Rendered()
        out.add([self.special("<|begin_of_text|>")], target=False)
        self._text_with_media(out, text, counts, target=True)
        out.add([self.tokenizer.eos_id], target=True)
        if counts:
            raise TemplateError(f"{len(counts)} media token counts left over: pass one per media reference")
        return out
