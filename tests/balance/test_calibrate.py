"""Step-balance calibration (Alg. 1 lines 3-8) on synthetic loss processes with known plateaus."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from megatron_omni.balance.calibrate import calibrate
from megatron_omni.balance.config import CalibrationConfig
from megatron_omni.balance.step_balance import loss_weights
from megatron_omni.config import load_config

REPO = Path(__file__).resolve().parents[2]

# L(n) = c + A exp(-n / tau), n = 1, 2, ...: plateau c, known in closed form.
CURVES = {"image": (2.0, 3.0, 100.0), "audio": (0.5, 4.0, 40.0), "text": (1.2, 1.0, 70.0)}


def _synthetic_steps():
    counters = {m: 0 for m in CURVES}

    def train_one_step(modality: str) -> float:
        counters[modality] += 1
        c, a, tau = CURVES[modality]
        return c + a * math.exp(-counters[modality] / tau)

    return train_one_step, counters


def synthetic_trainer(cfg, modality):
    """A `single_modality_trainer` stand-in for the CLI test: a fresh curve per call."""
    step, _ = _synthetic_steps()
    return step


def _expected_plateau_step(c, a, tau, k, delta):
    """Closed form of PlateauDetector's stop on a noiseless exponential (balance/step_balance.py)."""
    g = (math.exp(k / tau) - 1) / (k * (math.exp(1 / tau) - 1))
    n_star = tau * math.log(a * g * (math.exp(k / tau) * (1 - delta) - 1) / (delta * c))
    return max(2 * k, math.floor(n_star) + 1)


def test_weights_are_eq6_on_the_plateaus():
    settings = CalibrationConfig(window=50, delta=1e-4, max_steps=20000)
    step, counters = _synthetic_steps()
    result = calibrate(step, list(CURVES), settings)
    plateaus = [CURVES[m][0] for m in CURVES]
    # L* approaches c (the window mean at the stop is within delta-ish of the plateau) ...
    for m, (c, a, tau) in CURVES.items():
        assert result.converged_losses[m] == pytest.approx(c, rel=2e-3)
        assert result.steps_per_modality[m] == _expected_plateau_step(c, a, tau, 50, 1e-4) == counters[m]
        assert len(result.loss_curves[m]) == counters[m]
    # ... so the weights are Eq. 6 on the plateaus (alpha = 10), and exactly Eq. 6 on the recorded L*.
    assert list(result.weights.values()) == pytest.approx(loss_weights(plateaus, 10.0), rel=2e-3)
    assert list(result.weights.values()) == loss_weights(list(result.converged_losses.values()), 10.0)
    assert sum(result.weights.values()) == pytest.approx(10.0)
    # Smallest converged loss (audio) gets the largest weight; w_i * L_i* is constant.
    assert max(result.weights, key=result.weights.get) == "audio"


def test_no_plateau_is_an_error():
    step, _ = _synthetic_steps()
    with pytest.raises(RuntimeError, match="did not plateau within balance.calibration.max_steps=120"):
        calibrate(step, ["image"], CalibrationConfig(window=50, delta=1e-4, max_steps=120))


def test_cli_writes_an_includable_balance_section(tmp_path, monkeypatch):
    stage = tmp_path / "stage.yaml"
    stage.write_text(
        f"base: {REPO / 'configs/tiny/llm.yaml'}\n"
        "balance:\n  modalities: [image, audio, text]\n"
        "  calibration: {window: 20, delta: 0.001, max_steps: 5000}\n")
    out = tmp_path / "weights.yaml"
    monkeypatch.syspath_prepend(str(REPO))
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import calibrate_step_balance as tool
    finally:
        sys.path.remove(str(REPO / "tools"))
    assert tool.main(["--config", str(stage), "--out", str(out),
                      "--trainer", "tests.balance.test_calibrate:synthetic_trainer",
                      "balance.calibration.alpha=4.0"]) == 0
    step, _ = _synthetic_steps()
    expected = calibrate(step, ["image", "audio", "text"], CalibrationConfig(window=20, delta=0.001, alpha=4.0))
    # The stage config includes the written file as its balance section's base.
    final = tmp_path / "final.yaml"
    final.write_text(f"base: {REPO / 'configs/tiny/llm.yaml'}\n"
                     "balance: {base: weights.yaml, modalities: [image, audio, text]}\n")
    cfg = load_config(str(final))
    assert cfg.balance.step_weights == expected.weights
    assert "# alpha = 4" in out.read_text()
