"""Prompts of a GSPO stage and its rollouts as training samples.

`PromptSource`: the training rows of the stage blend's sources (held-out rows excluded, as every
stage's blend), each source scored by its own rule rewards (`BlendSource.rewards`).  The prompts of
rollout batch k are a weighted draw -- source weight shared by its rows -- seeded by (seed, k):
a pure function of the batch index, so a resumed run draws the same prompts without loader
state, and DP rank r takes its slice of the global draw.

`RolloutEncoder`: a manifest row -> its generation prompt (the chat template up to the assistant
header, media decoded exactly as training does: `sample_builder.decode_media`), and a prompt +
sampled response ids -> an `OmniSample` whose loss mask is 1 exactly where the label is a response
token (the positions whose per-token loss is -log pi(y_t)).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Sequence

import torch

from megatron_omni.config.loader import ConfigError
from megatron_omni.data.blend import BlendConfig, BlendSource, read_blend_manifests, split_heldout
from megatron_omni.data.chat_template import Rendered
from megatron_omni.data.manifest import ManifestRow
from megatron_omni.data.omni_batch import OmniSample
from megatron_omni.data.sample_builder import DecodedMedia, decode_media, rendered_sample
from megatron_omni.rl.rewards import RewardTarget, combined_reward

__all__ = ["PromptRow", "PromptSource", "RolloutEncoder", "EncodedPrompt"]


@dataclass
class PromptRow:
    row: ManifestRow
    source: BlendSource
    target: RewardTarget

    @property
    def modality(self) -> str:
        return self.row.modality


class PromptSource:
    def __init__(self, blend: BlendConfig, root: str, seed: int):
        missing = [s.name for s in blend.sources if not s.rewards]
        if missing:
            raise ConfigError(f"blend {blend.stage!r}: source(s) {missing} name no rewards; a GSPO stage scores every "
                              f"rollout, add e.g. rewards: {{exact_match: 1.0}} to each source")
        rows = read_blend_manifests(blend, root)
        split = split_heldout(blend, rows)
        self.rows: List[PromptRow] = []
        weights: List[float] = []
        for s in blend.sources:
            train = split[s.name].train
            for r in train:
                if r.conversations is None:
                    raise ConfigError(f"{r.where} ({r.id}): a GSPO prompt needs 'conversations' ending with the user "
                                      f"question (and optionally the reference answer)")
                target = RewardTarget.from_row(r.metadata, r.where)
                combined_reward(f"Answer: {target.answer}", target, s.rewards)  # a rule that cannot check it fails here
                self.rows.append(PromptRow(r, s, target))
                weights.append(s.weight / len(train))
        if not self.rows:
            raise ConfigError(f"blend {blend.stage!r}: no training rows left for GSPO prompts")
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.seed = seed
        self.modalities = list(dict.fromkeys(r.modality for r in self.rows))

    def draw(self, batch_index: int, count: int, dp_rank: int, dp_size: int) -> List[PromptRow]:
        """This DP rank's `count` prompts of rollout batch `batch_index` (the global draw holds
        count x dp_size, without replacement while rows last)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + batch_index)
        total = count * dp_size
        picks = torch.multinomial(self.weights, total, replacement=total > len(self.rows), generator=g)
        return [self.rows[i] for i in picks[dp_rank * count:(dp_rank + 1) * count].tolist()]


@dataclass
class EncodedPrompt:
    tokens: List[int]
    rendered: Rendered
    media: DecodedMedia


class RolloutEncoder:
    """Prompts and rollout samples with the training data path's template and media decoding;
    stop tokens and response text from the generation side's `ChatPrompts` (one definition)."""

    def __init__(self, chat, vision, audio, blend: BlendConfig, root: str):
        self.chat, self.vocab, self.template = chat, chat.vocab, chat.template
        self.vision, self.audio, self.blend, self.root = vision, audio, blend, root
        self.stop_ids = list(chat.stop_ids)

    def prompt(self, row: ManifestRow) -> EncodedPrompt:
        turns = list(row.conversations)
        if turns[-1].role == "assistant":  # the reference answer: the rules check it, the policy must not see it
            turns = turns[:-1]
        if not turns or turns[-1].role != "user":
            raise ConfigError(f"{row.where} ({row.id}): a GSPO prompt must end with a user turn")
        media = decode_media(row, root=self.root, vision=self.vision, audio=self.audio,
                             max_image_tokens=self.blend.max_image_tokens, max_video_frames=self.blend.max_video_frames)
        rendered = self.template.render_prompt(turns, media.token_counts)
        return EncodedPrompt(list(rendered.tokens), rendered, media)

    def sample(self, prompt: EncodedPrompt, row: ManifestRow, response: Sequence[int]) -> OmniSample:
        """The prompt followed by the sampled response ids (stop token included when it stopped)."""
        if not len(response):
            raise ValueError(f"{row.where}: empty rollout (generate returns >= 1 token per row)")
        rendered = dataclasses.replace(prompt.rendered, tokens=list(prompt.rendered.tokens),
                                       is_target=list(prompt.rendered.is_target))
        rendered.add([int(t) for t in response], target=True)
        return rendered_sample(rendered, prompt.media, row, self.vocab, self.vision)

    def decode(self, response: Sequence[int]) -> str:
        """The response's text, cut at the first stop token (`ChatPrompts.decode`)."""
        return self.chat.decode(response)
