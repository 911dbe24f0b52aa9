"""KL(pi_theta || pi_ref) per token, k3 estimator (Schulman, "Approximating KL divergence", 2020),
as GRPO (Shao et al., 2024, Eq. 4) and verl's ``low_var_kl`` use it:

    k3 = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1 = exp(r) - r - 1,   r = log pi_ref - log pi_theta

Unbiased for KL(pi_theta || pi_ref) on samples from pi_theta, and >= 0 per token (lower variance
than -r).  The reference log-probs are constants.
"""

from __future__ import annotations

import torch

__all__ = ["k3_kl"]


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate [B, T] from the policy's and the reference's log-probs of the samples."""
    if logp.shape != ref_logp.shape:
        raise ValueError(f"policy log-probs {tuple(logp.shape)} and reference log-probs {tuple(ref_logp.shape)} "
                         f"must have the same [batch, response] shape")
    r = ref_logp.detach().to(logp.dtype) - logp
    return torch.exp(r) - r - 1.0
