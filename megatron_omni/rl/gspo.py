"""Group Sequence Policy Optimization (Zheng et al., "Group Sequence Policy Optimization", 2025).

Per prompt x, G responses y_i are sampled from pi_old; with group-normalised advantages A_i
(`rl/advantages.py`) the objective maximised is (paper Eq. 5-7)

    J(theta) = E[ 1/G sum_i min( s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i ) ]
    s_i      = ( pi_theta(y_i|x) / pi_old(y_i|x) )^(1/|y_i|)
             = exp( 1/|y_i| sum_t [log pi_theta(y_i,t) - log pi_old(y_i,t)] )

-- one importance ratio per *sequence*, length-normalised, clipped as a whole.  The paper's clip
range is eps_low = 3e-4, eps_high = 4e-4 (Sec. 5.1: two orders of magnitude below GRPO's token
ratios, because a sequence ratio is a geometric mean).  The loss minimised is -J, averaged over
the sequences of the batch (`gspo_loss`).

GSPO-token (paper Eq. 13-14) gives each token its own advantage A_i,t with

    s_i,t = sg[s_i] * pi_theta(y_i,t) / sg[pi_theta(y_i,t)]
    J     = E[ 1/G sum_i 1/|y_i| sum_t min( s_i,t A_i,t, clip(s_i,t, ...) A_i,t ) ]

s_i,t equals s_i in value and its gradient w.r.t. log pi_theta(y_i,t) is s_i, so with A_i,t = A_i
(all we have: outcome rewards) it equals GSPO in loss, clipping and gradient (paper Sec. 4.3);
it is here for per-token advantages and as the check of that identity.

Optional KL to a reference policy: + kl_coef * 1/|y_i| sum_t k3_i,t (`rl/kl.py`), the
per-sequence token mean GRPO (Shao et al., 2024, Eq. 3) uses; GSPO itself uses none (kl_coef 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_omni.rl.kl import k3_kl

__all__ = ["GSPO_VARIANTS", "GSPOTerms", "gspo_loss", "gspo_terms", "sequence_log_ratio"]

GSPO_VARIANTS = ("sequence", "token")


@dataclass
class GSPOTerms:
    """Per-sequence pieces of the GSPO loss, [B] each (the loss is ``loss.mean()``)."""

    loss: torch.Tensor  # -min(s A, clip(s) A) (+ kl_coef * KL) per sequence
    ratio: torch.Tensor  # s_i (detached)
    clipped: torch.Tensor  # share of the sequence's tokens whose objective the clip zeroes (0/1 for GSPO)
    kl: torch.Tensor  # 1/|y_i| sum_t k3 (detached; zeros without a reference)
    length: torch.Tensor  # |y_i|


def _check(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> None:
    if logp.dim() != 2 or logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask {tuple(mask.shape)} "
                         f"must all be [batch, response_tokens]")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages {tuple(advantages.shape)} must be [batch] = [{logp.shape[0]}]")


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log s_i = 1/|y_i| sum_t mask * (logp - old_logp): [B].  Masked positions never enter (their
    log-probs may be anything, e.g. -inf on padding)."""
    m = mask.bool()
    length = m.sum(dim=-1)
    if bool((length == 0).any()):
        rows = torch.nonzero(length == 0).flatten().tolist()
        raise ValueError(f"rows {rows} have no response token in the mask; every rollout has >= 1 token "
                         f"(the EOS it stopped on counts)")
    diff = torch.where(m, logp - old_logp.detach(), torch.zeros((), dtype=logp.dtype, device=logp.device))
    return diff.sum(dim=-1) / length.to(logp.dtype)


def gspo_terms(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
               eps_low: float = 3e-4, eps_high: float = 4e-4, variant: str = "sequence",
               ref_logp: Optional[torch.Tensor] = None, kl_coef: float = 0.0) -> GSPOTerms:
    """The per-sequence GSPO loss and its diagnostics; ``logp`` carries the gradient, ``old_logp``,
    ``advantages`` and ``ref_logp`` are constants.  Computed in at least float32 (float64 stays)."""
    _check(logp, old_logp, advantages, mask)
    if variant not in GSPO_VARIANTS:
        raise ValueError(f"GSPO variant {variant!r}; use one of {', '.join(GSPO_VARIANTS)}")
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"GSPO clip range needs 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    dtype = torch.promote_types(logp.dtype, torch.float32)
    logp, old_logp = logp.to(dtype), old_logp.to(dtype)
    adv = advantages.detach().to(dtype)
    m = mask.bool()
    length = m.sum(dim=-1)
    log_s = sequence_log_ratio(logp, old_logp, m)
    s = torch.exp(log_s)
    lo, hi = 1.0 - eps_low, 1.0 + eps_high
    if variant == "sequence":
        objective = torch.minimum(s * adv, torch.clamp(s, lo, hi) * adv)
        clipped = ((adv > 0) & (s > hi)) | ((adv < 0) & (s < lo))
        clipped = clipped.to(dtype)
    else:
        zero = torch.zeros((), dtype=dtype, device=logp.device)
        safe_logp = torch.where(m, logp, zero)  # padding's log-probs never reach exp()
        s_tok = s.detach()[:, None] * torch.exp(safe_logp - safe_logp.detach())
        a_tok = adv[:, None].expand_as(s_tok)
        per_token = torch.minimum(s_tok * a_tok, torch.clamp(s_tok, lo, hi) * a_tok)
        objective = torch.where(m, per_token, zero).sum(dim=-1) / length.to(dtype)
        clipped_tok = (((a_tok > 0) & (s_tok > hi)) | ((a_tok < 0) & (s_tok < lo))) & m
        clipped = clipped_tok.to(dtype).sum(dim=-1) / length.to(dtype)
    loss = -objective
    kl = torch.zeros_like(s)
    if ref_logp is not None:
        if ref_logp.shape != logp.shape:
            raise ValueError(f"ref_logp {tuple(ref_logp.shape)} must be [batch, response_tokens] like logp")
        per_token_kl = torch.where(m, k3_kl(torch.where(m, logp, 0.0), torch.where(m, ref_logp.to(dtype), 0.0)), 0.0)
        seq_kl = per_token_kl.sum(dim=-1) / length.to(dtype)
        if kl_coef:
            loss = loss + kl_coef * seq_kl
        kl = seq_kl.detach()
    elif kl_coef:
        raise ValueError(f"kl_coef = {kl_coef} needs the reference policy's log-probs (ref_logp)")
    return GSPOTerms(loss=loss, ratio=s.detach(), clipped=clipped.detach(), kl=kl, length=length)


def gspo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              eps_low: float = 3e-4, eps_high: float = 4e-4, variant: str = "sequence",
              ref_logp: Optional[torch.Tensor] = None, kl_coef: float = 0.0) -> torch.Tensor:
    """Scalar GSPO loss -1/B sum_i min(s_i A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i) (+ KL term).

    logp / old_logp / mask: [B, T] per-token log-probs of the sampled response tokens under the
    current and the rollout policy, and which of the T positions are response tokens; advantages: [B].
    """
    return gspo_terms(logp, old_logp, advantages, mask, eps_low, eps_high, variant, ref_logp, kl_coef).loss.mean()
