"""Next-token choice from full-vocabulary logits: greedy, temperature, top-k, top-p, seeded.

The log-prob reported for a token is ``log_softmax(logits / T)`` of that token, T = `temperature`
(1 when greedy), taken *before* top-k/top-p filtering: the policy's own probability of the token,
the quantity GSPO's importance ratio needs, not the probability under the truncated sampler.  Its
normaliser (`SamplingParams.logprobs_over`):

* ``"model"`` (default): every logit the model outputs - the TP padding rows of the vocabulary and
  the media placeholders included - which is exactly what the training forward's (vocab-parallel)
  cross entropy normalises over, so at T = 1 a rollout's log-probs equal the trainer's
  ``-loss`` per token (pi_old straight from the rollout);
* ``"sampled"``: the vocabulary the sampler draws from (the real tokens, media placeholders masked).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor


@dataclass
class SamplingParams:
    """How `generate` picks tokens.

    `stop_ids`: a row ends after emitting any of them (EOS, ``<|eot_id|>``); the first one also pads
    the rows that ended early (`pad_id` overrides).  `top_k=0` and `top_p=1.0` switch those filters
    off.  `seed` seeds the sampler's own generator, so the same prompts, params and logits draw the
    same tokens at every TP/PP layout.
    """

    max_new_tokens: int = 32
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: Sequence[int] = field(default_factory=tuple)
    pad_id: Optional[int] = None
    logprobs_over: str = "model"  # "model" | "sampled": the log-probs' normaliser (module docstring)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"SamplingParams.temperature must be > 0 (got {self.temperature}); use greedy=True "
                             "for argmax decoding")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.logprobs_over not in ("model", "sampled"):
            raise ValueError(f"SamplingParams.logprobs_over must be 'model' or 'sampled', got {self.logprobs_over!r}")
        self.stop_ids = tuple(int(i) for i in self.stop_ids)

    @property
    def padding_id(self) -> int:
        if self.pad_id is not None:
            return int(self.pad_id)
        return self.stop_ids[0] if self.stop_ids else 0


def filter_top_k_top_p(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """`logits` [B, V] with everything outside the top-k / the top-p nucleus set to -inf.

    Nucleus: the smallest set of most likely tokens whose probability reaches `top_p` (the token
    that crosses the threshold is kept, so at least one token always survives)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p  # mass before this token already >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: Tensor, params: SamplingParams, generator: Optional[torch.Generator],
                model_logits: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(token ids [B] int64, their log-probs [B] float32) from `logits` [B, V] (float32, entries that
    must never be drawn already -inf).  `model_logits` [B, V_out]: all the model's output logits,
    the normaliser of ``logprobs_over="model"`` (default: `logits`)."""
    logits = logits.float()
    if params.greedy:
        tokens = logits.argmax(-1)
        logprobs = torch.log_softmax(logits, -1)
    else:
        scaled = logits / params.temperature
        logprobs = torch.log_softmax(scaled, -1)
        probs = filter_top_k_top_p(scaled, params.top_k, params.top_p).softmax(-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    if params.logprobs_over == "model" and model_logits is not None:
        scaled = model_logits.float() / (1.0 if params.greedy else params.temperature)
        return tokens, scaled.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(scaled, -1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
