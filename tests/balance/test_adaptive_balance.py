"""Dynamic adaptive balance (Eq. 8-11) against a direct transcription."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest

from megatron_omni.balance import AdaptiveBalancer


# ------------------------------------------------- independent reference
def reference_weights(history, H, f, alpha=0.9, eps=1e-6):
    """Direct loop transcription of Sec. 3.2, returns w~_t for t = 1..T.

    Segments are numbered t = 1..T; w~_0 = 1 and w~_t = 1 for t <= H
    ("fixed ... throughout the first H validation segments"); for t > H:
    Eq. 8 with lo = min{min window, eps}; OLS slope over x = t-H+1..t;
    Eq. 9, Eq. 10 and Eq. 11 (alpha multiplies w~_{t-1}).
    """
    T = len(history)
    M = len(history[0])
    w_tilde = [1.0] * M
    out = []
    for t in range(1, T + 1):
        if t > H:
            a = []
            for i in range(M):
                js = list(range(t - H + 1, t + 1))          # 1-based segment ids
                vals = [history[j - 1][i] for j in js]
                low = vals[0]
                high = vals[0]
                for v in vals:
                    if v < low:
                        low = v
                    if v > high:
                        high = v
                floor = low if low < eps else eps            # min{min{L}, eps}
                if high - floor == 0:
                    norm = [0.0 for _ in vals]
                else:
                    norm = [(v - floor) / (high - floor) for v in vals]
                # least squares for y = a x + b with x = segment index j
                # (centred normal equations: a = Sxy / Sxx)
                n = len(js)
                x_mean = sum(js) / n
                y_mean = sum(norm) / n
                num = 0.0
                den = 0.0
                for x, y in zip(js, norm):
                    num += (x - x_mean) * (y - y_mean)
                    den += (x - x_mean) ** 2
                a.append(num / den)
            denom = sum(abs(v) for v in a)
            a_t = [M * v / denom if denom != 0 else 0.0 for v in a]
            ex = [math.exp(v) for v in a_t]
            soft = [e / sum(ex) for e in ex]
            s = [soft[i] * (-1 * a_t[i]) for i in range(M)]
            ex2 = [math.exp(f * v) for v in s]
            w = [M * e / sum(ex2) for e in ex2]
            w_tilde = [alpha * w_tilde[i] + (1 - alpha) * w[i] for i in range(M)]
        out.append(list(w_tilde))
    return out


def synthetic_history(T=80, seed=0, noise=0.01):
    """4 modalities: fast / slow decay, plateau then overfit, large-scale loss."""
    rng = random.Random(seed)
    hist = []
    for t in range(T):
        l0 = 0.8 + 2.0 * math.exp(-t / 5.0)
        l1 = 1.5 + 1.0 * math.exp(-t / 40.0)
        l2 = 1.0 + 1.2 * math.exp(-t / 10.0) + (0.01 * (t - 30) if t > 30 else 0.0)
        l3 = 6.0 + 3.0 * math.exp(-t / 20.0)
        hist.append([v * (1.0 + noise * rng.gauss(0, 1)) for v in (l0, l1, l2, l3)])
    return hist


@pytest.mark.parametrize("H,f,alpha,seed", [(5, 1.0, 0.9, 0), (3, 5.0, 0.9, 1),
                                            (10, 2.0, 0.5, 2), (2, 20.0, 0.0, 3)])
def test_matches_transcription(H, f, alpha, seed):
    hist = synthetic_history(seed=seed)
    ref = reference_weights(hist, H, f, alpha)
    bal = AdaptiveBalancer(4, window=H, scale=f, ema=alpha)
    for t, row in enumerate(hist, start=1):
        got = bal.update(row)
        assert len(got) == 4
        for g, r in zip(got, ref[t - 1]):
            assert abs(g - r) <= 1e-12, (t, got, ref[t - 1])
        if t <= H:
            assert got == [1.0] * 4 and bal.last_raw_weights is None
        else:
            assert bal.last_raw_weights is not None
    # the EMA really moved the weights after warm-up
    assert max(abs(w - 1.0) for w in bal.weights) > 1e-3


def test_warmup_boundary_and_ema_initialisation():
    H, f = 4, 3.0
    hist = synthetic_history(T=H + 1, seed=5)
    bal = AdaptiveBalancer(4, window=H, scale=f)
    for row in hist[:H]:
        assert bal.update(row) == [1.0, 1.0, 1.0, 1.0]   # t = 1..H fixed (t <= H)
    assert bal.in_warmup
    w = bal.update(hist[H])                            # t = H + 1: first adaptive
    raw = bal.last_raw_weights
    assert w == pytest.approx([0.9 * 1.0 + 0.1 * r for r in raw], abs=1e-15)
    assert not bal.in_warmup and bal.segments == H + 1


def test_losses_below_eps_use_window_minimum():
    # Eq. 8 floor is min{min L, eps}: once a loss is below eps the floor is that loss
    hist = [[5e-7, 1.0], [3e-7, 0.9], [2e-7, 0.85], [1e-7, 0.8]]
    ref = reference_weights(hist, 2, 4.0)
    bal = AdaptiveBalancer(2, window=2, scale=4.0)
    for t, row in enumerate(hist):
        assert bal.update(row) == pytest.approx(ref[t], abs=1e-12)
    # both windows are falling; the normalised window of modality 0 spans [0, 1]
    assert bal.last_slopes[0] == pytest.approx(-1.0)


def test_behaviour_sharper_fall_gets_larger_weight():
    # M = 3, per-segment relative slopes chosen so |a~| <= 1 for the falling one:
    # modality 0 rises (overfitting), 1 is flat, 2 falls.  Paper: "gentler
    # convergence slopes received reduced weights ... sharper slopes ... higher".
    H = 5
    bal = AdaptiveBalancer(3, window=H, scale=10.0)
    for t in range(30):
        bal.update([1.0 + 0.02 * t, 2.0, 3.0 * (1.0 - 0.01 * t)])
        if t >= H:
            raw = bal.last_raw_weights
            assert all(w > 0 for w in raw)
            assert sum(raw) == pytest.approx(3.0, abs=1e-12)
            assert sum(bal.weights) == pytest.approx(3.0, abs=1e-12)
            assert raw[2] > raw[1] > raw[0]
            assert bal.last_scores[0] < 0 < bal.last_scores[2]
    w = bal.weights
    assert w[2] > w[1] > w[0] and all(v > 0 for v in w)


def test_behaviour_on_synthetic_history():
    hist = synthetic_history(T=80, seed=0, noise=0.0)
    bal = AdaptiveBalancer(4, window=5, scale=5.0)
    for row in hist:
        bal.update(row)
        if bal.last_raw_weights is not None:
            assert all(w > 0 for w in bal.last_raw_weights)
            assert sum(bal.last_raw_weights) == pytest.approx(4.0, abs=1e-12)
            assert all(w > 0 for w in bal.weights)
            assert sum(bal.weights) == pytest.approx(4.0, abs=1e-12)
    # at the end modality 2 is overfitting (rising) -> smallest weight
    assert bal.last_slopes[2] > 0
    assert min(range(4), key=lambda i: bal.weights[i]) == 2


def test_flat_losses_keep_weights_at_one():
    bal = AdaptiveBalancer(3, window=3, scale=2.0)
    for _ in range(10):
        w = bal.update([1.0, 2.0, 3.0])
    assert bal.last_slopes == [0.0, 0.0, 0.0]
    assert bal.last_raw_weights == [1.0, 1.0, 1.0]
    assert w == pytest.approx([1.0] * 3, abs=1e-15)


@pytest.mark.parametrize("cut", [0, 2, 5, 6, 17])
def test_state_dict_resume_is_exact(cut):
    hist = synthetic_history(T=40, seed=7)
    full = AdaptiveBalancer(4, window=5, scale=3.0)
    expected = [full.update(row) for row in hist]

    a = AdaptiveBalancer(4, window=5, scale=3.0)
    got = [a.update(row) for row in hist[:cut]]
    state = json.loads(json.dumps(a.state_dict()))     # e.g. checkpoint as JSON
    b = AdaptiveBalancer(4, window=5, scale=3.0)
    b.load_state_dict(state)
    assert b.weights == a.weights and b.segments == cut
    got += [b.update(row) for row in hist[cut:]]
    assert got == expected                              # bit-identical
    assert b.state_dict() == full.state_dict()

    c = AdaptiveBalancer(4, window=5, scale=3.0)
    c.load_state_dict(copy.deepcopy(full.state_dict()))
    assert c.update(hist[0]) == full.update(hist[0])


def test_validation():
    with pytest.raises(ValueError):
        AdaptiveBalancer(0, window=3, scale=1.0)
    with pytest.raises(ValueError):
        AdaptiveBalancer(2, window=1, scale=1.0)
    with pytest.raises(ValueError):
        AdaptiveBalancer(2, window=3, scale=0.0)
    with pytest.raises(ValueError):
        AdaptiveBalancer(2, window=3, scale=1.0, ema=1.5)
    with pytest.raises(ValueError):
        AdaptiveBalancer(2, window=3, scale=1.0, eps=-1.0)
    bal = AdaptiveBalancer(2, window=3, scale=1.0)
    with pytest.raises(ValueError):
        bal.update([1.0])
    with pytest.raises(ValueError):
        bal.update([1.0, float("nan")])
    assert bal.segments == 0
    with pytest.raises(ValueError):
        AdaptiveBalancer(2, window=4, scale=1.0).load_state_dict(bal.state_dict())
    with pytest.raises(ValueError):
        AdaptiveBalancer(3, window=3, scale=1.0).load_state_dict(bal.state_dict())
