"""Step-balance calibration: M2-omni Alg. 1 lines 3-8.

For each modality i: train on a small subset D_i^sub alone "until convergence", record the
converged loss L_i*, then w = Eq. 6 (`loss_weights`).  Convergence is `PlateauDetector`'s
criterion (see `balance.step_balance`): the mean loss of the last K steps improved on the K
steps before by less than ``delta`` (relative), ``patience`` steps in a row; L_i* is that
last-K mean.  A modality that has not plateaued after ``max_steps`` is an error, not a guess.

The training itself is the caller's: ``train_one_step(modality) -> loss`` runs one optimizer
update on that modality's subset and returns its mean token loss.  Each modality must start
from the same initial weights (a fresh model per modality); ``train_one_step`` is called for
one modality until it converges, then for the next, so a trainer factory can rebuild its state
when the modality changes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

from megatron_omni.balance.config import CalibrationConfig
from megatron_omni.balance.step_balance import PlateauDetector, loss_weights

log = logging.getLogger(__name__)

__all__ = ["CalibrationResult", "calibrate"]


@dataclass
class CalibrationResult:
    converged_losses: Dict[str, float]  # L_i*
    weights: Dict[str, float]  # w_i of Eq. 6 (sum = alpha)
    steps_per_modality: Dict[str, int]  # updates until the plateau was detected
    loss_curves: Dict[str, List[float]]  # every recorded loss, for plots / review


def calibrate(train_one_step: Callable[[str], float], modalities: Sequence[str],
              settings: CalibrationConfig = CalibrationConfig()) -> CalibrationResult:
    """Run Alg. 1 lines 4-8 over `modalities` (in order) and return L* and the Eq. 6 weights."""
    if not modalities:
        raise ValueError("calibrate needs at least one modality")
    if len(set(modalities)) != len(modalities):
        raise ValueError(f"duplicate modalities: {list(modalities)}")
    converged: Dict[str, float] = {}
    steps: Dict[str, int] = {}
    curves: Dict[str, List[float]] = {}
    for modality in modalities:
        detector = PlateauDetector(window=settings.window, delta=settings.delta, patience=settings.patience,
                                   min_steps=settings.min_steps)
        curve: List[float] = []
        while not detector.plateaued:
            if detector.steps >= settings.max_steps:
                last = detector.last_improvement
                raise RuntimeError(
                    f"calibration of '{modality}' did not plateau within balance.calibration.max_steps="
                    f"{settings.max_steps} (last window improvement {last if last is None else f'{last:.3%}'}, "
                    f"threshold {settings.delta:.3%}); raise max_steps or delta, or lower the learning rate")
            loss = float(train_one_step(modality))
            curve.append(loss)
            detector.update(loss)
        converged[modality] = float(detector.converged_loss)
        steps[modality] = int(detector.plateau_step)
        curves[modality] = curve
        log.info("calibration: %s plateaued after %d steps at L* = %.5f", modality, steps[modality],
                 converged[modality])
    w = loss_weights([converged[m] for m in modalities], alpha=settings.alpha)
    return CalibrationResult(converged_losses=converged, weights=dict(zip(modalities, w)),
                             steps_per_modality=steps, loss_curves=curves)
