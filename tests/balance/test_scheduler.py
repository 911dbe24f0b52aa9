"""ModalityRoundScheduler against the definitions of Sec. 3.1 (Eq. 3-5) and Sec. 3.3."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from megatron_omni.balance.config import AdaptiveConfig, SchedulerConfig
from megatron_omni.balance.scheduler import ModalityRoundScheduler


def _sched(mode, modalities, n=8, seed=7, **kw):
    return ModalityRoundScheduler(SchedulerConfig(mode=mode, modalities=modalities, **kw), n, seed)


def test_round_robin_is_eq4():
    mods = ["image", "video", "audio"]
    s = _sched("round_robin", mods, pure_text_share=None)
    for t in range(30):
        plan = s.plan(t)
        # Eq. 4: i_t = (t mod M) + 1 in 1-based indexing; the whole update is one modality.
        assert plan.microbatch_modalities == [mods[t % 3]] * 8


def test_round_robin_with_text_share():
    mods = ["image", "audio", "text"]
    s = _sched("round_robin", mods, pure_text_share=0.25)
    seq = [s.plan(t).microbatch_modalities[0] for t in range(16)]
    assert all(len(set(s.plan(t).microbatch_modalities)) == 1 for t in range(16))
    # Updates 3, 7, 11, 15 are pure text (exactly 1 in 4); the others alternate image/audio.
    assert [t for t, m in enumerate(seq) if m == "text"] == [3, 7, 11, 15]
    assert [m for m in seq if m != "text"] == ["image", "audio"] * 6


def test_random_frequencies_follow_data_volume():
    # Eq. 3: P(i) = volume_i / sum volume.  Pearson chi-square over 4000 updates x 8 microbatches
    # (2 degrees of freedom): P(chi2 > 20) ~ 5e-5 for a correct sampler; the seed is fixed anyway.
    volumes = {"image": 6.0, "video": 3.0, "audio": 1.0}
    s = _sched("random", list(volumes), pure_text_share=None, data_volumes=volumes)
    counts = Counter(m for t in range(4000) for m in s.plan(t).microbatch_modalities)
    n = sum(counts.values())
    assert n == 4000 * 8
    chi2 = sum((counts[m] - n * v / 10.0) ** 2 / (n * v / 10.0) for m, v in volumes.items())
    assert chi2 < 20.0, (counts, chi2)
    # And a wrong sampler (uniform) is far outside the bound: the test can fail.
    chi2_uniform = sum((counts[m] - n / 3) ** 2 / (n / 3) for m in volumes)
    assert chi2_uniform > 1000


def test_random_text_share_exact_and_plan_is_pure():
    volumes = {"image": 2.0, "audio": 1.0, "text": 5.0}
    s = _sched("random", list(volumes), pure_text_share=0.25, data_volumes=volumes)
    for t in range(50):
        c = Counter(s.plan(t).microbatch_modalities)
        assert c["text"] == 2 and c["image"] + c["audio"] == 6
    # Pure function of (seed, step): another instance (another DP rank, a resumed run) agrees,
    # queried in any order; another seed differs.
    again = _sched("random", list(volumes), pure_text_share=0.25, data_volumes=volumes)
    assert [again.plan(t) for t in reversed(range(50))][::-1] == [s.plan(t) for t in range(50)]
    other = _sched("random", list(volumes), seed=8, pure_text_share=0.25, data_volumes=volumes)
    assert [other.plan(t).microbatch_modalities for t in range(50)] != [s.plan(t).microbatch_modalities
                                                                         for t in range(50)]


def test_accumulation_groups_every_modality_every_update():
    s = _sched("accumulation", ["image", "video", "audio", "text"], n=8, pure_text_share=0.25)
    totals = Counter()
    for t in range(30):
        mbs = s.plan(t).microbatch_modalities
        c = Counter(mbs)
        assert c["text"] == 2  # 25% of 8, exactly
        assert all(c[m] >= 2 for m in ("image", "video", "audio"))
        # one contiguous group per modality
        groups = [m for k, m in enumerate(mbs) if k == 0 or mbs[k - 1] != m]
        assert sorted(groups) == sorted(set(mbs))
        totals.update(c)
    # 6 non-text microbatches over 3 modalities: even.
    assert totals == {"image": 60, "video": 60, "audio": 60, "text": 60}


@pytest.mark.parametrize("n,share", [(6, 0.25), (10, 0.3), (7, 0.25), (5, 0.1)])
def test_text_share_exact_over_period(n, share):
    s = _sched("accumulation", ["image", "audio", "text"], n=n, pure_text_share=share)
    q = s.cfg.text_share
    steps = 40 * q.denominator
    plans = [Counter(s.plan(t).microbatch_modalities) for t in range(steps)]
    cum = 0
    for t, c in enumerate(plans):
        cum += c["text"]
        assert cum == math.floor(q * n * (t + 1))  # cumulative rounding, never off by more than < 1
        assert c["text"] in (math.floor(q * n), math.ceil(q * n))
        assert sum(c.values()) == n
    assert sum(c["text"] for c in plans) == q * n * steps  # exact over whole periods
    # The non-text remainder rotates: image and audio end up within one microbatch.
    assert abs(sum(c["image"] for c in plans) - sum(c["audio"] for c in plans)) <= 1


def test_weights_in_force_and_state_dict():
    mods = ["image", "audio", "text"]
    cfg = SchedulerConfig(mode="accumulation", modalities=mods, step_weights={"image": 2.0, "audio": 5.0, "text": 3.0},
                          adaptive=AdaptiveConfig(enabled=True, window=2, scale=1.0))
    s = ModalityRoundScheduler(cfg, 8, seed=1)
    assert s.plan(0).modality_weights == {"image": 2.0, "audio": 5.0, "text": 3.0}
    bal = s.make_adaptive_balancer()
    for losses in ([3.0, 2.0, 1.0], [2.0, 1.9, 1.0], [1.0, 1.8, 1.0]):
        w = bal.update(losses)
    s.set_adaptive_weights(w)
    got = s.plan(5).modality_weights
    assert got == pytest.approx({m: sw * a for m, sw, a in zip(mods, (2.0, 5.0, 3.0), w)})
    assert w != [1.0, 1.0, 1.0]
    restored = ModalityRoundScheduler(cfg, 8, seed=1)
    restored.load_state_dict(s.state_dict())
    assert restored.plan(5) == s.plan(5)


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="needs 'text'"):
        SchedulerConfig(modalities=["image", "audio"])
    with pytest.raises(ValueError, match="data_volumes"):
        SchedulerConfig(mode="random", modalities=["image", "audio"], pure_text_share=0)
    with pytest.raises(ValueError, match="exactly the modalities"):
        SchedulerConfig(modalities=["image", "text"], step_weights={"image": 1.0})
    with pytest.raises(ValueError, match="mode must be one of"):
        SchedulerConfig(mode="roundrobin", modalities=["image"], pure_text_share=None)
    with pytest.raises(ValueError, match="num_microbatches >= 4"):
        _sched("accumulation", ["image", "video", "audio", "text"], n=3)
    with pytest.raises(ValueError, match="adaptive.enabled is false"):
        _sched("accumulation", ["image", "text"]).set_adaptive_weights([1.0, 1.0])
