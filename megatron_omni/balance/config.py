"""Typed configuration of modality balancing (the ``balance:`` section of a stage config).

Every M2-omni hyper-parameter carries its source; values the paper does not state are
marked "not in the paper" and are our defaults.

    balance:
      mode: accumulation             # random | round_robin | accumulation (Sec. 3.1)
      modalities: [image, video, audio, text]
      pure_text_share: 0.25          # Sec. 3.3
      step_weights: {image: 2.1, video: 3.0, audio: 1.9, text: 3.0}   # Eq. 6, from calibration
      adaptive: {enabled: true, window: 5, scale: 1.0}                  # Sec. 3.2
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Dict, List, Optional

MODES = ("random", "round_robin", "accumulation")
TEXT = "text"  # the pure-text stream of Sec. 3.3


@dataclass
class AdaptiveConfig:
    """Dynamic adaptive balance, Sec. 3.2 / Eq. 8-11 (`AdaptiveBalancer`)."""

    enabled: bool = False
    window: int = 5  # H, validation segments per slope window (Eq. 8); not in the paper
    scale: float = 1.0  # f of Eq. 10; not in the paper
    ema: float = 0.9  # alpha of Eq. 11 ("set to 0.9")
    eps: float = 1e-6  # epsilon of Eq. 8 ("set to 1e-6")


@dataclass
class CalibrationConfig:
    """Step-balance calibration, Alg. 1 lines 3-8 (`balance.calibrate`).

    The plateau criterion is `PlateauDetector`'s (the paper only says "until convergence").
    """

    alpha: float = 10.0  # alpha of Eq. 6 ("we set alpha to 10", with accumulation, Eq. 7)
    window: int = 50  # PlateauDetector K (steps per moving-average window); not in the paper
    delta: float = 0.01  # < 1% relative improvement of the window mean = converged; not in the paper
    patience: int = 1
    min_steps: int = 0
    max_steps: int = 5000  # a run that has not plateaued by then is an error


@dataclass
class SchedulerConfig:
    """Which modality every pipeline microbatch carries, and the loss weight of each modality.

    ``modalities`` fixes the modality index i of the paper (its order is the order of
    `AdaptiveBalancer`'s weights).  ``text`` is the pure-text stream of Sec. 3.3: when
    ``pure_text_share`` is a number it must be listed, and it receives exactly that share of
    the microbatches (accumulation, random) or of the updates (round_robin); the remaining
    modalities follow ``mode``.  ``pure_text_share: null`` treats ``text`` (if listed) as an
    ordinary modality.
    """

    mode: str = "accumulation"  # Sec. 3.1 / Eq. 3-5; the paper's best (Table 11)
    modalities: List[str] = field(default_factory=list)
    # random mode: P(modality) proportional to its data volume (Eq. 3), e.g. sample counts.
    data_volumes: Optional[Dict[str, float]] = None
    pure_text_share: Optional[float] = 0.25  # "around 25%", Sec. 3.3
    # w_i of Eq. 6 / 7 (Alg. 1 line 7); null = all 1.  Written by tools/calibrate_step_balance.py.
    step_weights: Optional[Dict[str, float]] = None
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"balance.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.modalities:
            raise ValueError("balance.modalities must list at least one modality, e.g. [image, audio, text]")
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"balance.modalities has duplicates: {self.modalities}")
        share = self.pure_text_share
        if share is not None:
            if not (0.0 <= share < 1.0) or not math.isfinite(share):
                raise ValueError(f"balance.pure_text_share must lie in [0, 1), got {share!r}")
            if share > 0 and TEXT not in self.modalities:
                raise ValueError(f"balance.pure_text_share={share} needs '{TEXT}' in balance.modalities "
                                 f"(or set pure_text_share: 0 for a stage without pure text)")
            if share == 0 and TEXT in self.modalities:
                raise ValueError(f"'{TEXT}' is listed in balance.modalities but pure_text_share is 0, so it "
                                 f"would never be scheduled; remove it or set pure_text_share: null")
            if share > 0 and len(self.modalities) == 1:
                raise ValueError("balance.pure_text_share needs at least one modality besides text")
        for name, table in (("data_volumes", self.data_volumes), ("step_weights", self.step_weights)):
            if table is None:
                continue
            if set(table) != set(self.modalities):
                raise ValueError(f"balance.{name} must give exactly the modalities {self.modalities}, "
                                 f"got {sorted(table)}")
            for k, v in table.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                    raise ValueError(f"balance.{name}.{k} must be a number > 0, got {v!r}")
        if self.mode == "random" and self.data_volumes is None:
            raise ValueError("balance.mode=random draws modalities proportional to data volume (Eq. 3): "
                             "set balance.data_volumes, e.g. {image: 1.2e8, audio: 3.0e7}")

    @property
    def text_share(self) -> Optional[Fraction]:
        """The pure-text share as an exact fraction (0.25 -> 1/4), None when text is ordinary."""
        if self.pure_text_share is None or TEXT not in self.modalities:
            return None
        return Fraction(repr(float(self.pure_text_share))).limit_denominator(10_000)

    @property
    def scheduled_modalities(self) -> List[str]:
        """The modalities that `mode` distributes (text excluded when it has a fixed share)."""
        if self.text_share is None:
            return list(self.modalities)
        return [m for m in self.modalities if m != TEXT]
