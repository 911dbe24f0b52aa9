"""Group-normalised advantages A_i = (r_i - mean(r)) / (std(r) + eps), computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_omni.rl.advantages import group_advantages


def test_two_groups_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64)
    a = group_advantages(r, group_size=4, eps=1e-6)
    # group 0: mean 0.5, deviations +-0.5, sample std sqrt(4 * 0.25 / 3) = 0.57735...
    s = math.sqrt(1.0 / 3.0)
    assert a[:4].tolist() == pytest.approx([0.5 / (s + 1e-6), -0.5 / (s + 1e-6), -0.5 / (s + 1e-6), 0.5 / (s + 1e-6)],
                                           abs=1e-12)
    # group 1: all rewards equal -> no signal, exactly zero
    assert a[4:].tolist() == [0.0, 0.0, 0.0, 0.0]
    # population std of group 0 is 0.5
    p = group_advantages(r, group_size=4, eps=1e-6, std="population")
    assert p[:4].tolist() == pytest.approx([0.5 / 0.500001, -0.5 / 0.500001, -0.5 / 0.500001, 0.5 / 0.500001], abs=1e-12)


def test_matches_statistics_module_per_group():
    import statistics

    g = torch.Generator().manual_seed(0)
    r = torch.rand(5 * 6, generator=g, dtype=torch.float64)
    a = group_advantages(r, group_size=6, eps=0.0)
    for k in range(5):
        grp = r[6 * k:6 * k + 6].tolist()
        mu, sd = statistics.fmean(grp), statistics.stdev(grp)
        assert a[6 * k:6 * k + 6].tolist() == pytest.approx([(x - mu) / sd for x in grp], abs=1e-12)
        assert abs(sum(a[6 * k:6 * k + 6].tolist())) < 1e-12  # zero mean within the group


def test_rejects_bad_groups():
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(4), group_size=1)
    with pytest.raises(ValueError, match="whole number of groups"):
        group_advantages(torch.ones(5), group_size=2)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.ones(2, 2), group_size=2)
    with pytest.raises(ValueError, match="sample, population"):
        group_advantages(torch.ones(4), group_size=2, std="unbiased")
