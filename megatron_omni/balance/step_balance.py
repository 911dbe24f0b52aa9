"""Step balance (M2-omni Sec. 3.1, Eq. 6, Algorithm 1 lines 3-8).

Two pieces live here, both pure Python (no torch):

* :func:`loss_weights` turns the converged per-modality losses ``L_i*`` of the
  small-subset calibration runs into the loss weights of Eq. 6::

      w_i = alpha * (1 / L_i*) / sum_j (1 / L_j*)

  so the weights sum to ``alpha`` (the paper uses ``alpha = 10`` with the
  accumulation strategy, Eq. 7) and a modality with a smaller converged loss
  gets a proportionally larger weight (``w_i * L_i*`` is the same for all i).

* :class:`PlateauDetector` decides when a calibration run ("train on
  D_i^sub until convergence", Alg. 1 line 5) has converged and what its
  ``L_i*`` is.  The paper does not state a criterion; ours is below.

Plateau criterion
-----------------
Losses are fed one training step at a time.  Let ``K`` be ``window`` and, once
at least ``2K`` losses have been seen, let

    m_now  = mean of the last K losses          (steps n-K+1 .. n)
    m_prev = mean of the K losses before those  (steps n-2K+1 .. n-K)
    r      = (m_prev - m_now) / |m_prev|        (relative improvement)

Step ``n`` *satisfies* the criterion when ``r < delta`` (a rising loss,
``r < 0``, satisfies it too).  The run has plateaued at the first step at
which the criterion has been satisfied on ``patience`` consecutive steps and
at least ``min_steps`` losses have been seen.  The converged loss is then
``L* = m_now``, the mean loss over the final window.

Defaults: ``window = 50``, ``delta = 0.01`` (less than 1% improvement of the
K-step moving average over the previous K steps), ``patience = 1``,
``min_steps = 0`` (the 2K-step minimum always applies).

For a noiseless exponential decay ``L(n) = c + A*exp(-n/tau)`` the two window
means satisfy ``m_prev - c = exp(K/tau) * (m_now - c)``, hence
``r = (exp(K/tau) - 1) * (m_now - c) / m_prev`` and at the stopping step
``L* - c < delta * m_prev / (exp(K/tau) - 1)``.  With
``m_prev - c = exp(K/tau) * (m_now - c)`` and
``m_now - c = A * g * exp(-n/tau)``, ``g = (exp(K/tau) - 1) / (K * (exp(1/tau) - 1))``,
the (patience 1) stop is exactly step ``max(2K, floor(n*) + 1)`` with
``n* = tau * ln(A * g * (exp(K/tau) * (1 - delta) - 1) / (delta * c))``
(c = 2, A = 3, tau = 100, K = 50, delta = 0.01: step 481, L* = 2.0316, i.e. 1.6%
above c; use a smaller delta or larger K for a tighter L*).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["loss_weights", "PlateauDetector", "detect_plateau"]


def loss_weights(converged_losses: Sequence[float], alpha: float = 10.0) -> List[float]:
    """Eq. 6: ``w_i = alpha * (1/L_i*) / sum_j (1/L_j*)``.

    Args:
        converged_losses: ``L_i*`` per modality, in the modality order the
            weights are wanted in.  Must be non-empty, finite and > 0.
        alpha: total weight mass (the weights sum to ``alpha``); finite, > 0.

    Returns:
        The list of weights ``w_i`` (same length/order as the input).

    Raises:
        ValueError / TypeError on invalid input.
    """
    if isinstance(converged_losses, (str, bytes)):
        raise TypeError("converged_losses must be a sequence of numbers, not a string")
    try:
        losses = [float(x) for x in converged_losses]
    except TypeError as exc:  # not iterable / non-numeric entries
        raise TypeError(f"converged_losses must be a sequence of numbers: {exc}") from exc
    if not losses:
        raise ValueError("converged_losses must be non-empty (one L_i* per modality)")
    for i, x in enumerate(losses):
        if not math.isfinite(x):
            raise ValueError(f"converged loss L_{i}* = {x!r} is not finite")
        if x <= 0.0:
            raise ValueError(f"converged loss L_{i}* = {x!r} must be > 0 (Eq. 6 uses 1/L_i*)")
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha <= 0.0:
        raise ValueError(f"alpha = {alpha!r} must be finite and > 0")
    inv = [1.0 / x for x in losses]
    total = math.fsum(inv)
    return [alpha * v / total for v in inv]


class PlateauDetector:
    """Moving-average plateau detector for step-balance calibration runs.

    See the module docstring for the exact criterion.  Usage::

        det = PlateauDetector(window=50, delta=0.01)
        for step in ...:
            if det.update(loss):
                break
        L_star = det.converged_loss

    ``update`` keeps returning True once the plateau has been reached (further
    losses are ignored); ``converged_loss`` and ``plateau_step`` are frozen at
    the first detection.
    """

    def __init__(self, window: int = 50, delta: float = 0.01, patience: int = 1,
                 min_steps: int = 0):
        if int(window) != window or window < 1:
            raise ValueError(f"window must be a positive integer, got {window!r}")
        if not math.isfinite(delta) or delta <= 0:
            raise ValueError(f"delta must be finite and > 0, got {delta!r}")
        if int(patience) != patience or patience < 1:
            raise ValueError(f"patience must be a positive integer, got {patience!r}")
        if int(min_steps) != min_steps or min_steps < 0:
            raise ValueError(f"min_steps must be a non-negative integer, got {min_steps!r}")
        self.window = int(window)
        self.delta = float(delta)
        self.patience = int(patience)
        self.min_steps = int(min_steps)
        self._recent: deque = deque(maxlen=2 * self.window)
        self.steps = 0
        self._streak = 0
        self.last_improvement: Optional[float] = None
        self.plateau_step: Optional[int] = None
        self.converged_loss: Optional[float] = None

    @property
    def plateaued(self) -> bool:
        return self.plateau_step is not None

    def update(self, loss: float) -> bool:
        """Feed the loss of the next step; return True once plateaued."""
        if self.plateaued:
            return True
        loss = float(loss)
        if not math.isfinite(loss):
            raise ValueError(f"loss at step {self.steps + 1} is not finite: {loss!r}")
        self._recent.append(loss)
        self.steps += 1
        k = self.window
        if len(self._recent) < 2 * k:
            return False
        vals = list(self._recent)
        m_prev = math.fsum(vals[:k]) / k
        m_now = math.fsum(vals[k:]) / k
        if m_prev == 0.0:
            rel = 0.0 if m_now == 0.0 else (math.inf if m_now < 0.0 else -math.inf)
        else:
            rel = (m_prev - m_now) / abs(m_prev)
        self.last_improvement = rel
        self._streak = self._streak + 1 if rel < self.delta else 0
        if self._streak >= self.patience and self.steps >= self.min_steps:
            self.plateau_step = self.steps
            self.converged_loss = m_now
            return True
        return False

    # -- checkpointing (calibration runs may be resumed) -------------------
    def state_dict(self) -> Dict[str, Any]:
        return {
            "window": self.window, "delta": self.delta, "patience": self.patience,
            "min_steps": self.min_steps, "recent": list(self._recent),
            "steps": self.steps, "streak": self._streak,
            "last_improvement": self.last_improvement,
            "plateau_step": self.plateau_step, "converged_loss": self.converged_loss,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key in ("window", "delta", "patience", "min_steps"):
            if state[key] != getattr(self, key):
                raise ValueError(f"PlateauDetector {key} mismatch: checkpoint {state[key]!r}"
                                 f" vs configured {getattr(self, key)!r}")
        self._recent = deque((float(x) for x in state["recent"]), maxlen=2 * self.window)
        self.steps = int(state["steps"])
        self._streak = int(state["streak"])
        self.last_improvement = state["last_improvement"]
        self.plateau_step = state["plateau_step"]
        self.converged_loss = state["converged_loss"]


def detect_plateau(losses: Sequence[float], window: int = 50, delta: float = 0.01,
                   patience: int = 1, min_steps: int = 0) -> Optional[Tuple[int, float]]:
    """Run :class:`PlateauDetector` over a recorded loss curve.

    Returns ``(plateau_step, L*)`` (1-based step count at detection) or None if
    the curve never plateaus.
    """
    det = PlateauDetector(window=window, delta=delta, patience=patience, min_steps=min_steps)
    for x in losses:
        if det.update(x):
            return det.plateau_step, det.converged_loss
    return None
