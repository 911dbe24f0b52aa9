"""Step balance: Eq. 6 loss weights and the calibration plateau detector."""

from __future__ import annotations

import json
import math
import random

import pytest

from megatron_omni.balance import PlateauDetector, detect_plateau, loss_weights


# ----------------------------------------------------------------- Eq. 6
def test_loss_weights_hand_computed():
    # 1/L* = [1, 1/2, 1/4], sum 7/4 -> weights = 10 * [4, 2, 1] / 7
    w = loss_weights([1.0, 2.0, 4.0])
    assert w == pytest.approx([40 / 7, 20 / 7, 10 / 7], rel=1e-15)
    assert sum(w) == pytest.approx(10.0, rel=1e-15)


def test_loss_weights_alpha_and_invariants():
    w = loss_weights([2.5, 0.8], alpha=1.0)
    # 1/2.5 = 0.4, 1/0.8 = 1.25 -> [0.4, 1.25] / 1.65
    assert w == pytest.approx([0.4 / 1.65, 1.25 / 1.65], rel=1e-14)
    # w_i * L_i* is the same for every modality
    losses = [0.7, 1.3, 2.9, 5.0]
    w = loss_weights(losses, alpha=3.0)
    prods = [a * b for a, b in zip(w, losses)]
    assert max(prods) - min(prods) < 1e-14
    assert sum(w) == pytest.approx(3.0, rel=1e-15)
    # single modality gets everything; equal losses split evenly
    assert loss_weights([3.0]) == pytest.approx([10.0])
    assert loss_weights([1.7, 1.7], alpha=10) == pytest.approx([5.0, 5.0])
    # accepts tuples / generators of ints
    assert loss_weights((1, 1)) == pytest.approx([5.0, 5.0])


@pytest.mark.parametrize("bad", [[], [1.0, 0.0], [1.0, -2.0], [float("nan")],
                                 [1.0, float("inf")]])
def test_loss_weights_rejects_bad_losses(bad):
    with pytest.raises(ValueError):
        loss_weights(bad)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_loss_weights_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError):
        loss_weights([1.0, 2.0], alpha=alpha)


def test_loss_weights_rejects_non_numeric():
    with pytest.raises(TypeError):
        loss_weights("123")
    with pytest.raises(TypeError):
        loss_weights(5)


# ------------------------------------------------------------- plateau
def _expected_stop(curve, k, delta):
    """Brute-force transcription of the stated criterion (patience 1)."""
    for n in range(2 * k, len(curve) + 1):
        prev = sum(curve[n - 2 * k:n - k]) / k
        now = sum(curve[n - k:n]) / k
        if (prev - now) / abs(prev) < delta:
            return n, now
    return None


def test_plateau_exponential_decay():
    c, a, tau, k, delta = 2.0, 3.0, 100.0, 50, 0.01
    curve = [c + a * math.exp(-n / tau) for n in range(1, 5001)]
    got = detect_plateau(curve, window=k, delta=delta)
    exp = _expected_stop(curve, k, delta)
    assert got is not None and exp is not None
    assert got[0] == exp[0]
    assert got[1] == pytest.approx(exp[1], rel=1e-12)
    # stated number of steps, closed form: the window means satisfy
    # m_now - c = a g e^{-n/tau},  g = (e^{k/tau} - 1) / (k (e^{1/tau} - 1)),
    # m_prev - c = e^{k/tau} (m_now - c); r < delta  <=>
    # m_now - c < delta c / (e^{k/tau} (1 - delta) - 1)  <=>  n > n*, with
    # n* = tau ln(a g (e^{k/tau}(1 - delta) - 1) / (delta c)) = 480.75 here.
    g = (math.exp(k / tau) - 1) / (k * (math.exp(1 / tau) - 1))
    n_star = tau * math.log(a * g * (math.exp(k / tau) * (1 - delta) - 1) / (delta * c))
    assert got[0] == max(2 * k, math.floor(n_star) + 1) == 481
    # guaranteed accuracy of L*: L* - c < delta * m_prev / (e^{k/tau} - 1)
    m_prev = sum(curve[got[0] - 2 * k:got[0] - k]) / k
    assert 0 < got[1] - c < delta * m_prev / (math.exp(k / tau) - 1)
    assert got[1] == pytest.approx(c, rel=0.02)


def test_plateau_noisy_decay_and_resume():
    rng = random.Random(0)
    c = 1.5
    curve = [c + 4.0 * math.exp(-n / 80.0) + rng.gauss(0.0, 0.02) for n in range(1, 3001)]
    det = PlateauDetector(window=50, delta=0.005, patience=5)
    stop = None
    for i, x in enumerate(curve):
        if det.update(x):
            stop = i + 1
            break
        if i == 300:  # checkpoint/resume mid-run through JSON
            state = json.loads(json.dumps(det.state_dict()))
            det = PlateauDetector(window=50, delta=0.005, patience=5)
            det.load_state_dict(state)
    assert stop is not None and stop == det.plateau_step
    assert 300 < stop < 1000
    assert det.converged_loss == pytest.approx(c, abs=0.03)
    assert det.update(100.0) is True and det.converged_loss == pytest.approx(c, abs=0.03)


def test_plateau_constant_and_rising():
    assert detect_plateau([1.0] * 200, window=20) == (40, 1.0)
    rising = [1.0 + 0.01 * n for n in range(100)]
    step, l_star = detect_plateau(rising, window=10)
    assert step == 20 and l_star == pytest.approx(sum(rising[10:20]) / 10)
    # steeply falling never plateaus
    assert detect_plateau([100.0 * 0.9 ** n for n in range(100)], window=10) is None
    # min_steps delays the decision
    assert detect_plateau([1.0] * 200, window=20, min_steps=75)[0] == 75


def test_plateau_validation():
    with pytest.raises(ValueError):
        PlateauDetector(window=0)
    with pytest.raises(ValueError):
        PlateauDetector(delta=0.0)
    with pytest.raises(ValueError):
        PlateauDetector(patience=0)
    det = PlateauDetector(window=3)
    with pytest.raises(ValueError):
        det.update(float("nan"))
    with pytest.raises(ValueError):
        PlateauDetector(window=4).load_state_dict(det.state_dict())
