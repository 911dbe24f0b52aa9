"""DPO (Rafailov et al. 2023, Eq. 7) and the alignment loss of M2-omni Eq. 2, on hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_omni.training.dpo import alignment_loss, dpo_loss, sequence_logprobs


def test_sequence_logprobs_from_megatron_per_token_loss():
    # megatron returns per-token loss = -log p; the response is tokens 1..2 of row 0, 2..3 of row 1.
    per_token_loss = torch.tensor([[0.5, 1.0, 2.0, 9.0], [7.0, 8.0, 0.25, 0.75]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]])
    assert sequence_logprobs(-per_token_loss, mask).tolist() == [-3.0, -1.0]
    with pytest.raises(ValueError, match="same"):
        sequence_logprobs(per_token_loss, mask[:, :3])


def test_dpo_equals_formula_on_hand_computed_logprobs():
    beta = 0.5
    pc = torch.tensor([-10.0, -4.0])  # policy, chosen
    pr = torch.tensor([-12.0, -3.0])  # policy, rejected
    rc = torch.tensor([-11.0, -4.0])  # reference, chosen
    rr = torch.tensor([-11.0, -5.0])  # reference, rejected
    # Pair 0: chosen reward 0.5*(-10+11) = 0.5, rejected 0.5*(-12+11) = -0.5, margin 1.0
    # Pair 1: chosen reward 0.5*(-4+4) = 0.0, rejected 0.5*(-3+5) = 1.0, margin -1.0
    # loss = mean(-log sigmoid(1), -log sigmoid(-1)) = mean(0.3132617, 1.3132617) = 0.8132617
    loss, m = dpo_loss(pc, pr, rc, rr, beta)
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    assert expected == pytest.approx(0.8132617, abs=1e-7)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["chosen_reward"].item() == pytest.approx(0.25)
    assert m["rejected_reward"].item() == pytest.approx(0.25)
    assert m["reward_margin"].item() == pytest.approx(0.0)
    assert m["accuracy"].item() == 0.5
    # At the reference (policy == reference) the loss is log 2 whatever beta.
    loss0, _ = dpo_loss(rc, rr, rc, rr, beta=3.0)
    assert loss0.item() == pytest.approx(math.log(2.0))


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc = torch.tensor([-10.0, -4.0], requires_grad=True)
    pr = torch.tensor([-12.0, -3.0], requires_grad=True)
    rc = torch.tensor([-11.0, -4.0], requires_grad=True)
    rr = torch.tensor([-11.0, -5.0], requires_grad=True)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.5)
    loss.backward()
    # Gradient descent increases chosen log-probs (negative grad) and decreases rejected ones;
    # dL/dpc_k = -beta * sigmoid(-margin_k) / n.
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    sig = torch.sigmoid(-torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(pc.grad, -0.5 * sig / 2)
    torch.testing.assert_close(pr.grad, 0.5 * sig / 2)
    assert rc.grad is None and rr.grad is None  # the reference is a constant


def test_alignment_loss_lambda_weighting():
    dpo = torch.tensor(0.8, requires_grad=True)
    it = torch.tensor(2.0, requires_grad=True)
    total = alignment_loss(dpo, it)  # paper default lambda = 0.3
    assert total.item() == pytest.approx(0.8 + 0.3 * 2.0)
    total.backward()
    assert dpo.grad.item() == 1.0 and it.grad.item() == pytest.approx(0.3)
    assert alignment_loss(dpo, it, lam=0.0).item() == pytest.approx(0.8)
