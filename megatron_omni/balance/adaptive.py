"""Dynamic adaptive balance (M2-omni Sec. 3.2, Eq. 8-11), pure Python.

:class:`AdaptiveBalancer` receives, once per validation segment, the
per-modality validation losses ``L^val_{i,t}`` and returns the loss weights
``w~_{i,t}`` that are in force for every training step until the next
validation segment ("The adjusted modality-specific loss weight w~_{i,t} is
used for all training steps until the next validation segment").

Reading of the paper (segments are numbered t = 1, 2, ... by ``update`` calls)
--------------------------------------------------------------------------------
Warm-up.  "we set all modality-specific loss weight w~_{i,0} to 1 and maintain
these fixed values throughout the first H validation segments. For the t-th
validation segment (where t > H), we first compute ..."  Hence segments
t = 1..H (inclusive, i.e. "<= H") return all-ones, even though at t = H a full
window already exists; the first adaptive segment is t = H + 1, whose window is
segments 2..H+1.

Eq. 8 (normalisation), transcribed literally, for the window
W_t = {t-H+1, ..., t}::

    lo_{i,t} = min{ min_{j in W_t} L_{i,j}, eps }
    L~_{i,j} = (L_{i,j} - lo_{i,t}) / (max_{j in W_t} L_{i,j} - lo_{i,t})

Note the inner operator really is ``min{., eps}``: for ordinary losses (all
> eps = 1e-6) the floor is eps itself, so L~ ~= L / max_window(L) -- a scale
normalisation that keeps relative convergence rates comparable across
modalities with different loss ranges (a min-max normalisation would map every
monotone window onto [0, 1] and erase the rate).  The floor only becomes the
window minimum if some loss is below eps.  The same window statistics
(those of segment t) normalise all H points of the window that is regressed
at segment t.  Rule: if the denominator is 0 (all H losses equal and <= eps)
the normalised window is taken as all zeros (slope 0).

Slope.  Ordinary least-squares line a*x + b through (x_k, L~_{i,t-H+1+k}),
x_k = k = 0..H-1 (unit spacing per segment; the slope does not depend on the
offset of x)::

    a_{i,t} = sum_k (x_k - xbar)(y_k - ybar) / sum_k (x_k - xbar)^2

Eq. 9.  a~_{i,t} = M * a_{i,t} / sum_j |a_{j,t}|;
s_{i,t} = softmax_i(a~_{.,t}) * (-a~_{i,t})  (softmax over modalities, then an
elementwise product).  Rule: if sum_j |a_{j,t}| == 0 (every window flat) then
a~ = 0, hence s = 0 and w = 1 (Eq. 10), so the EMA relaxes towards all-ones.

Eq. 10.  w_{i,t} = M * softmax_i(f * s_{.,t}); f = ``scale``; sum_i w_{i,t} = M.

Eq. 11.  w~_{i,t} = alpha * w~_{i,t-1} + (1 - alpha) * w_{i,t}, alpha = ``ema``
(0.9 in the paper): alpha multiplies the *previous smoothed* weight.  The EMA is
initialised with the warm-up value, i.e. w~_{i,H} = 1, so the first adaptive
segment returns 0.9 * 1 + 0.1 * w_{i,H+1}.  Since both terms sum to M, so
does w~.

Behaviour implied by Eq. 9-10 (as the paper's text says: "modalities exhibiting
gentler convergence slopes received reduced weights ... those displaying
sharper slopes were assigned higher weights"): with ``g(x) = -x * exp(x)``,
s_i is proportional to g(a~_i); a rising (overfitting) modality (a~ > 0) gets a
negative score and the smallest weight, a flat one gets score ~0, and a falling
one a positive score.  g peaks at a~ = -1, so among falling modalities the
ordering is by |a~| only while |a~| <= 1.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["AdaptiveBalancer"]


def _softmax(xs: Sequence[float]) -> List[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    z = math.fsum(e)
    return [v / z for v in e]


def _window_slope(ys: Sequence[float], eps: float) -> float:
    """Eq. 8 normalisation of one modality's window, then the OLS slope."""
    n = len(ys)
    lo = min(min(ys), eps)
    den = max(ys) - lo
    if den > 0.0:
        norm = [(y - lo) / den for y in ys]
    else:  # all equal and <= eps: flat window
        norm = [0.0] * n
    xbar = (n - 1) / 2.0
    ybar = math.fsum(norm) / n
    sxy = math.fsum((k - xbar) * (y - ybar) for k, y in enumerate(norm))
    sxx = math.fsum((k - xbar) ** 2 for k in range(n))
    return sxy / sxx


class AdaptiveBalancer:
    """Per-modality loss weights from validation-loss slopes (Eq. 8-11).

    Args:
        num_modalities: M (>= 1).
        window: H, the historical window in validation segments (>= 2: a
            slope needs two points); also the number of warm-up segments.
        scale: f of Eq. 10 (finite, > 0).
        ema: alpha of Eq. 11 (0 <= ema <= 1; paper 0.9).
        eps: epsilon of Eq. 8 (>= 0; paper 1e-6).

    ``update(val_losses)`` appends one segment and returns w~_t (a new list).
    ``weights`` is the weight currently in force (all ones before any
    segment).  Diagnostics of the last adaptive segment are kept in
    ``last_slopes`` (a), ``last_normalized_slopes`` (a~), ``last_scores`` (s)
    and ``last_raw_weights`` (w, before the EMA); they are None during warm-up.
    """

    def __init__(self, num_modalities: int, window: int, scale: float,
                 ema: float = 0.9, eps: float = 1e-6):
        if isinstance(num_modalities, bool) or int(num_modalities) != num_modalities \
                or num_modalities < 1:
            raise ValueError(f"num_modalities must be an integer >= 1, got {num_modalities!r}")
        if isinstance(window, bool) or int(window) != window or window < 2:
            raise ValueError(f"window (H) must be an integer >= 2, got {window!r}")
        scale = float(scale)
        if not math.isfinite(scale) or scale <= 0.0:
            raise ValueError(f"scale (f) must be finite and > 0, got {scale!r}")
        ema = float(ema)
        if not (0.0 <= ema <= 1.0):
            raise ValueError(f"ema (alpha) must lie in [0, 1], got {ema!r}")
        eps = float(eps)
        if not math.isfinite(eps) or eps < 0.0:
            raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
        self.num_modalities = int(num_modalities)
        self.window = int(window)
        self.scale = scale
        self.ema = ema
        self.eps = eps
        self._history: List[List[float]] = []
        self._weights: List[float] = [1.0] * self.num_modalities
        self.last_slopes: Optional[List[float]] = None
        self.last_normalized_slopes: Optional[List[float]] = None
        self.last_scores: Optional[List[float]] = None
        self.last_raw_weights: Optional[List[float]] = None

    # ------------------------------------------------------------------
    @property
    def segments(self) -> int:
        """Number of validation segments seen so far (t of the last update)."""
        return len(self._history)

    @property
    def weights(self) -> List[float]:
        return list(self._weights)

    @property
    def history(self) -> List[List[float]]:
        return [list(row) for row in self._history]

    @property
    def in_warmup(self) -> bool:
        """True while the weights in force are the fixed warm-up ones (t <= H)."""
        return self.segments <= self.window

    # ------------------------------------------------------------------
    def update(self, val_losses: Sequence[float]) -> List[float]:
        """Record segment t's validation losses and return w~_t (Eq. 8-11)."""
        losses = [float(x) for x in val_losses]
        m = self.num_modalities
        if len(losses) != m:
            raise ValueError(f"expected {m} validation losses, got {len(losses)}")
        for i, x in enumerate(losses):
            if not math.isfinite(x):
                raise ValueError(f"validation loss of modality {i} is not finite: {x!r}")
        self._history.append(losses)
        t = len(self._history)
        if t <= self.window:  # warm-up: w~ fixed at 1 for the first H segments
            return self.weights

        h = self.window
        win = self._history[-h:]
        slopes = [_window_slope([row[i] for row in win], self.eps) for i in range(m)]
        total = math.fsum(abs(a) for a in slopes)
        if total > 0.0:
            a_n = [m * a / total for a in slopes]
        else:
            a_n = [0.0] * m
        p = _softmax(a_n)
        scores = [p_i * (-a_i) for p_i, a_i in zip(p, a_n)]
        raw = [m * v for v in _softmax([self.scale * s for s in scores])]
        alpha = self.ema
        self._weights = [alpha * wp + (1.0 - alpha) * w for wp, w in zip(self._weights, raw)]
        self.last_slopes = slopes
        self.last_normalized_slopes = a_n
        self.last_scores = scores
        self.last_raw_weights = raw
        return self.weights

    # ------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Plain-Python (JSON/torch.save friendly) state; exact float round-trip."""
        return {
            "num_modalities": self.num_modalities,
            "window": self.window,
            "scale": self.scale,
            "ema": self.ema,
            "eps": self.eps,
            "segments": self.segments,
            "history": self.history,
            "weights": self.weights,
            "last_slopes": None if self.last_slopes is None else list(self.last_slopes),
            "last_normalized_slopes": (None if self.last_normalized_slopes is None
                                       else list(self.last_normalized_slopes)),
            "last_scores": None if self.last_scores is None else list(self.last_scores),
            "last_raw_weights": (None if self.last_raw_weights is None
                                 else list(self.last_raw_weights)),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key in ("num_modalities", "window", "scale", "ema", "eps"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"AdaptiveBalancer {key} mismatch: checkpoint "
                                 f"{state[key]!r} vs configured {getattr(self, key)!r}")
        history = [[float(x) for x in row] for row in state["history"]]
        weights = [float(x) for x in state["weights"]]
        m = self.num_modalities
        if any(len(row) != m for row in history) or len(weights) != m:
            raise ValueError("AdaptiveBalancer state has the wrong number of modalities")
        if int(state.get("segments", len(history))) != len(history):
            raise ValueError("AdaptiveBalancer state: segments != len(history)")
        self._history = history
        self._weights = weights

        def _opt(key):
            v = state.get(key)
            return None if v is None else [float(x) for x in v]

        self.last_slopes = _opt("last_slopes")
        self.last_normalized_slopes = _opt("last_normalized_slopes")
        self.last_scores = _opt("last_scores")
        self.last_raw_weights = _opt("last_raw_weights")
