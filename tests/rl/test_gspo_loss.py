"""GSPO loss and gradient against an independent float64 transcription of Zheng et al. (2025),
Eq. 5-7 (sequence) and Eq. 13-14 (GSPO-token), written with plain python loops over sequences
and tokens -- no shared code with megatron_omni.rl.gspo."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_omni.rl.gspo import gspo_loss, gspo_terms

EPS_LOW, EPS_HIGH = 3e-4, 4e-4


def _paper_loss(logp, old, adv, mask, eps_low, eps_high, ref=None, kl_coef=0.0):
    """-1/B sum_i min(s_i A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i) [+ kl_coef 1/|y_i| sum_t k3],
    s_i = exp(1/|y_i| sum_t (logp - old)), one sequence at a time (autograd gives its gradient)."""
    B, T = logp.shape
    total = torch.zeros((), dtype=torch.float64)
    for i in range(B):
        tokens = [t for t in range(T) if mask[i, t]]
        log_ratio = sum(logp[i, t] - old[i, t] for t in tokens) / len(tokens)
        s = torch.exp(log_ratio)
        clipped = torch.clamp(s, 1 - eps_low, 1 + eps_high)
        term = -torch.minimum(s * adv[i], clipped * adv[i])
        if ref is not None:
            k3 = sum(torch.exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]) - 1 for t in tokens)
            term = term + kl_coef * k3 / len(tokens)
        total = total + term
    return total / B


def _random_case(seed, B=6, T=9, spread=1e-3):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    # small policy moves, so that some sequence ratios fall inside the tiny clip range and some outside
    logp = old + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    start = torch.randint(0, T, (B,), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i in range(B):  # a response somewhere in the row (left / right padding both occur)
        a = min(int(start[i]), T - int(lengths[i]))
        mask[i, a:a + int(lengths[i])] = True
    return logp, old, adv, mask


@pytest.mark.parametrize("variant", ["sequence", "token"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gspo_loss_and_gradient_equal_paper_formula(seed, variant):
    logp, old, adv, mask = _random_case(seed)
    mine = logp.clone().requires_grad_(True)
    loss = gspo_loss(mine, old, adv, mask, EPS_LOW, EPS_HIGH, variant=variant)
    loss.backward()
    ref_in = logp.clone().requires_grad_(True)
    ref = _paper_loss(ref_in, old, adv, mask, EPS_LOW, EPS_HIGH)
    ref.backward()
    assert loss.dtype == torch.float64
    assert abs(loss.item() - ref.item()) <= 1e-9
    assert torch.allclose(mine.grad, ref_in.grad, rtol=0, atol=1e-9)
    # the case exercises both branches of the clip: some sequences clipped, some not
    terms = gspo_terms(logp, old, adv, mask, EPS_LOW, EPS_HIGH, variant=variant)
    assert 0 < int((terms.clipped > 0).sum()) < logp.shape[0], terms.ratio


@pytest.mark.parametrize("variant", ["sequence", "token"])
def test_gradient_is_closed_form(variant):
    """d loss / d logp_i,t = -A_i s_i / (B |y_i|) on response tokens of unclipped sequences, else 0
    (GSPO paper Eq. 10 and, for GSPO-token, Eq. 17 with A_i,t = A_i)."""
    logp, old, adv, mask = _random_case(3, B=8, T=7)
    x = logp.clone().requires_grad_(True)
    gspo_loss(x, old, adv, mask, EPS_LOW, EPS_HIGH, variant=variant).backward()
    B = logp.shape[0]
    expected = torch.zeros_like(logp)
    for i in range(B):
        n = int(mask[i].sum())
        s = math.exp(float(((logp[i] - old[i]) * mask[i]).sum()) / n)
        a = float(adv[i])
        clipped = (a > 0 and s > 1 + EPS_HIGH) or (a < 0 and s < 1 - EPS_LOW)
        if not clipped:
            expected[i, mask[i]] = -a * s / (B * n)
    assert torch.allclose(x.grad, expected, rtol=0, atol=1e-12)


def test_padding_values_never_matter():
    logp, old, adv, mask = _random_case(4)
    a = logp.clone().requires_grad_(True)
    loss_a = gspo_loss(a, old, adv, mask)
    loss_a.backward()
    poisoned, old_p = logp.clone(), old.clone()
    poisoned[~mask], old_p[~mask] = -math.inf, math.nan
    b = poisoned.requires_grad_(True)
    for variant in ("sequence", "token"):
        b.grad = None
        loss_b = gspo_loss(b, old_p, adv, mask, variant=variant)
        loss_b.backward()
        assert loss_b.item() == pytest.approx(loss_a.item(), abs=1e-12)
        assert torch.equal(b.grad[~mask], torch.zeros_like(b.grad[~mask]))
        assert torch.allclose(b.grad[mask], a.grad[mask], atol=1e-12)


def test_kl_term_equals_k3_transcription():
    logp, old, adv, mask = _random_case(5)
    g = torch.Generator().manual_seed(7)
    ref_logp = logp + 0.05 * torch.randn(logp.shape, generator=g, dtype=torch.float64)
    x = logp.clone().requires_grad_(True)
    terms = gspo_terms(x, old, adv, mask, EPS_LOW, EPS_HIGH, ref_logp=ref_logp, kl_coef=0.04)
    terms.loss.mean().backward()
    y = logp.clone().requires_grad_(True)
    _paper_loss(y, old, adv, mask, EPS_LOW, EPS_HIGH, ref=ref_logp, kl_coef=0.04).backward()
    assert abs(terms.loss.mean().item() - _paper_loss(logp, old, adv, mask, EPS_LOW, EPS_HIGH, ref_logp, 0.04).item()) < 1e-9
    assert torch.allclose(x.grad, y.grad, atol=1e-9, rtol=0)
    assert bool((terms.kl > 0).all())  # k3 >= 0, > 0 where the policies differ
    # at the reference itself the KL is exactly 0
    assert gspo_terms(logp, old, adv, mask, ref_logp=logp, kl_coef=1.0).kl.abs().max().item() == 0.0


def test_on_policy_value_and_clip_fraction():
    """At theta = theta_old every s_i = 1: loss = -mean(A), nothing clipped; far off-policy the clip
    counts exactly the sequences whose side of the range their advantage sign cuts."""
    logp, _, adv, mask = _random_case(6)
    terms = gspo_terms(logp, logp, adv, mask)
    assert terms.loss.mean().item() == pytest.approx(-adv.mean().item(), abs=1e-12)
    assert terms.clipped.sum().item() == 0
    shifted = logp + 0.01 * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0], dtype=torch.float64)[:, None]
    adv2 = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.0, 2.0], dtype=torch.float64)
    t = gspo_terms(shifted, logp, adv2, mask)
    # s > 1+eh with A > 0 (row 0), s < 1-el with A < 0 (row 3) are clipped; rows 1, 2 are on the free side
    assert t.clipped.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]


def test_bf16_inputs_compute_in_float32():
    logp, old, adv, mask = _random_case(8)
    loss = gspo_loss(logp.bfloat16(), old.bfloat16(), adv.bfloat16(), mask)
    assert loss.dtype == torch.float32
    ref = _paper_loss(logp.bfloat16().double(), old.bfloat16().double(), adv.bfloat16().double(), mask,
                      EPS_LOW, EPS_HIGH)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)


def test_bad_inputs_name_the_problem():
    logp, old, adv, mask = _random_case(9)
    with pytest.raises(ValueError, match=r"must all be \[batch, response_tokens\]"):
        gspo_loss(logp, old[:, :-1], adv, mask)
    with pytest.raises(ValueError, match=r"advantages .* must be \[batch\]"):
        gspo_loss(logp, old, adv[:-1], mask)
    empty = mask.clone()
    empty[2] = False
    with pytest.raises(ValueError, match=r"rows \[2\] have no response token"):
        gspo_loss(logp, old, adv, empty)
    with pytest.raises(ValueError, match="variant"):
        gspo_loss(logp, old, adv, mask, variant="tokens")
    with pytest.raises(ValueError, match="needs the reference"):
        gspo_loss(logp, old, adv, mask, kl_coef=0.1)
