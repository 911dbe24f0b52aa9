"""ModalityRoundScheduler: the modality of every pipeline microbatch, and the loss weights (Sec. 3.1-3.3).

For each global batch (one optimizer update, step t = 0, 1, ...) `plan(t)` returns the list of
modalities of this DP rank's ``num_microbatches`` microbatches, the paper's constraint being
that a mini-batch holds one modality (Sec. 3.1), and the weights w_i in force.  The plan is a
pure function of (seed, t): every DP rank computes the same list without communicating, and
a resumed run replays it.  Each DP rank loads *different* samples of the modality it is told
(the sampler's job); DP ranks agree on the modality of microbatch k.

Modes (Sec. 3.1), M' = the modalities the mode distributes (``text`` excluded when it has a
fixed share), N = num_microbatches:

* ``round_robin`` (Eq. 4): every microbatch of update t carries modality i_t = t mod M'
  (0-based; the paper's "+1" is 1-based indexing).
* ``random`` (Eq. 3): every microbatch independently draws modality i with probability
  volume_i / sum_j volume_j.
* ``accumulation`` (Eq. 5 / 7): every update holds one contiguous group of microbatches per
  modality, so the update is sum_i w_i grad L_i over all modalities.  The N - n_text
  microbatches are split evenly; when they do not divide by M', the remainder goes to the
  next modalities in a rotation that carries on across updates (so counts are even over M'
  updates).

Pure-text share q (Sec. 3.3), exact by cumulative rounding: update t carries
``floor(q*N*(t+1)) - floor(q*N*t)`` text microbatches (accumulation, random), so the first T
updates hold exactly floor(q*N*T) of them; with q*N an integer it is q*N in every update
(8 microbatches, 25% -> 2).  In round_robin, update t is a pure-text update iff
``floor(q*(t+1)) - floor(q*t) == 1`` (25% -> updates 3, 7, 11, ...), and the other updates
take the round-robin modalities in turn.

Weights: w_i = step_weight_i (Eq. 6, from calibration; 1 if unset) x adaptive_i (Eq. 11,
from `AdaptiveBalancer`, when enabled; 1 before the first `set_adaptive_weights`).  They
apply to each modality's mean token loss (see `balance.loss`), whichever mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Dict, List, Mapping, Sequence, Union

import numpy as np

from megatron_omni.balance.adaptive import AdaptiveBalancer
from megatron_omni.balance.config import TEXT, SchedulerConfig

__all__ = ["ModalityRoundScheduler", "StepPlan", "text_microbatches"]


@dataclass(frozen=True)
class StepPlan:
    step: int
    microbatch_modalities: List[str]  # one per microbatch of this DP rank, identical on every rank
    modality_weights: Dict[str, float]  # w_i in force for every configured modality

    def counts(self) -> Dict[str, int]:
        """Microbatches per modality in this update (modalities absent from it are left out)."""
        out: Dict[str, int] = {}
        for m in self.microbatch_modalities:
            out[m] = out.get(m, 0) + 1
        return out


def text_microbatches(share: Fraction, num_microbatches: int, step: int) -> int:
    """Pure-text microbatches of update `step`: floor(q*N*(t+1)) - floor(q*N*t) (exact cumulative)."""
    per_update = share * num_microbatches
    return math.floor(per_update * (step + 1)) - math.floor(per_update * step)


class ModalityRoundScheduler:
    """Plans which modality each microbatch of an update carries (see module docstring).

    Args:
        cfg: the ``balance`` section.
        num_microbatches: microbatches per DP rank per update (global batch / (micro batch x DP)).
        seed: the run's seed (``train.seed``); only random mode uses it.
    """

    def __init__(self, cfg: SchedulerConfig, num_microbatches: int, seed: int):
        if isinstance(num_microbatches, bool) or int(num_microbatches) != num_microbatches or num_microbatches < 1:
            raise ValueError(f"num_microbatches must be an integer >= 1, got {num_microbatches!r}")
        self.cfg = cfg
        self.num_microbatches = int(num_microbatches)
        self.seed = int(seed)
        self.modalities = list(cfg.modalities)
        self._share = cfg.text_share
        self._scheduled = cfg.scheduled_modalities
        self._adaptive = [1.0] * len(self.modalities)
        if cfg.mode == "accumulation":
            most_text = 0 if self._share is None else math.ceil(self._share * self.num_microbatches)
            room = self.num_microbatches - most_text
            if room < len(self._scheduled):
                raise ValueError(
                    f"balance.mode=accumulation puts one microbatch group per modality in every update: "
                    f"{len(self._scheduled)} modalities {self._scheduled} + up to {most_text} pure-text "
                    f"microbatches need num_microbatches >= {len(self._scheduled) + most_text}, got "
                    f"{self.num_microbatches}; raise train.global_batch_size or lower train.micro_batch_size")
        if cfg.data_volumes is not None:
            vol = np.array([float(cfg.data_volumes[m]) for m in self._scheduled], dtype=np.float64)
            self._probs = vol / vol.sum()
        else:
            self._probs = None

    # ------------------------------------------------------------------ weights
    @property
    def step_weights(self) -> Dict[str, float]:
        sw = self.cfg.step_weights
        return {m: float(sw[m]) if sw is not None else 1.0 for m in self.modalities}

    def modality_weights(self) -> Dict[str, float]:
        """w_i in force: step-balance weight x adaptive weight (Eq. 7 with Eq. 11)."""
        sw = self.step_weights
        return {m: sw[m] * a for m, a in zip(self.modalities, self._adaptive)}

    def make_adaptive_balancer(self) -> AdaptiveBalancer:
        """The `AdaptiveBalancer` of this config; its weight i is modality ``modalities[i]``."""
        a = self.cfg.adaptive
        return AdaptiveBalancer(len(self.modalities), window=a.window, scale=a.scale, ema=a.ema, eps=a.eps)

    def set_adaptive_weights(self, weights: Union[Sequence[float], Mapping[str, float]]) -> None:
        """Install w~_t (the return value of `AdaptiveBalancer.update`, in ``modalities`` order,
        or a {modality: weight} mapping); in force until the next call."""
        if not self.cfg.adaptive.enabled:
            raise ValueError("adaptive weights given but balance.adaptive.enabled is false")
        if isinstance(weights, Mapping):
            if set(weights) != set(self.modalities):
                raise ValueError(f"adaptive weights must cover exactly {self.modalities}, got {sorted(weights)}")
            values = [float(weights[m]) for m in self.modalities]
        else:
            values = [float(w) for w in weights]
            if len(values) != len(self.modalities):
                raise ValueError(f"expected {len(self.modalities)} adaptive weights ({self.modalities}), "
                                 f"got {len(values)}")
        for m, w in zip(self.modalities, values):
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"adaptive weight of {m} must be finite and >= 0, got {w!r}")
        self._adaptive = values

    # ------------------------------------------------------------------ plan
    def plan(self, step: int) -> StepPlan:
        """The plan of update `step` (0-based count of updates since the start of the run)."""
        if isinstance(step, bool) or int(step) != step or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        step = int(step)
        mode = self.cfg.mode
        if mode == "round_robin":
            mbs = [self._round_robin_modality(step)] * self.num_microbatches
        else:
            n_text = 0 if self._share is None else text_microbatches(self._share, self.num_microbatches, step)
            rest = self.num_microbatches - n_text
            if mode == "random":
                mbs = self._random(step, rest)
            else:
                mbs = self._accumulation(step, rest)
            mbs = mbs + [TEXT] * n_text
        return StepPlan(step=step, microbatch_modalities=mbs, modality_weights=self.modality_weights())

    def _round_robin_modality(self, step: int) -> str:
        m = len(self._scheduled)
        if self._share is None:
            return self._scheduled[step % m]  # Eq. 4
        q = self._share
        if math.floor(q * (step + 1)) - math.floor(q * step) == 1:
            return TEXT
        non_text_before = step - math.floor(q * step)
        return self._scheduled[non_text_before % m]

    def _random(self, step: int, count: int) -> List[str]:
        # A fresh generator per (seed, step): no state to checkpoint, identical on every rank.
        rng = np.random.default_rng([self.seed, step])
        idx = rng.choice(len(self._scheduled), size=count, p=self._probs)
        return [self._scheduled[i] for i in idx]

    def _accumulation(self, step: int, count: int) -> List[str]:
        m = len(self._scheduled)
        base, extra = divmod(count, m)
        start = self._remainders_before(step) % m
        sizes = [base] * m
        for j in range(extra):
            sizes[(start + j) % m] += 1
        return [name for name, n in zip(self._scheduled, sizes) for _ in range(n)]

    def _remainders_before(self, step: int) -> int:
        """Sum over updates s < step of ((N - n_text(s)) mod M'): the rotation offset."""
        m = len(self._scheduled)
        n = self.num_microbatches
        if self._share is None:
            return step * (n % m)
        period = (self._share * n).denominator  # n_text(s) is periodic with this period
        per_period = sum((n - text_microbatches(self._share, n, s)) % m for s in range(period))
        full, part = divmod(step, period)
        return full * per_period + sum((n - text_microbatches(self._share, n, s)) % m for s in range(part))

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> Dict[str, Any]:
        """Only the adaptive weights are state; the plan is a pure function of (seed, step)."""
        return {"modalities": list(self.modalities), "adaptive_weights": list(self._adaptive)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["modalities"]) != self.modalities:
            raise ValueError(f"scheduler checkpoint has modalities {state['modalities']}, the config has "
                             f"{self.modalities}; the order fixes the adaptive weights, keep it")
        weights = [float(w) for w in state["adaptive_weights"]]
        if len(weights) != len(self.modalities):
            raise ValueError("scheduler checkpoint: wrong number of adaptive weights")
        self._adaptive = weights
