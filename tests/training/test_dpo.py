"""DPO (Rafailov et al. 2023, Eq. 7) on hand-computed numbers, and the trainer's preference loss on packed rows.

The lambda of M2-omni Eq. 2 is not a separate function: the step weights the instruction-tuning
microbatches by it (training/tasks/alignment.py), through the per-modality scales of balance/loss.py."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_omni.data.omni_batch import OmniMicrobatch
from megatron_omni.training.dpo import dpo_loss
from megatron_omni.data.preference_stream import PREFERENCE
from megatron_omni.training.tasks.alignment import DPO_ACCURACY, DPO_LOSS, PlannedPair, pair_logprobs, preference_loss


def _preference_microbatch(per_token_loss, loss_mask, segment_lengths):
    """Rows of (chosen, rejected, padding) segments, as data/preference_stream.py packs them."""
    B, S = per_token_loss.shape
    cu = torch.tensor([0] + [r * S + c for r, row in enumerate(segment_lengths)
                             for c in torch.tensor(row).cumsum(0).tolist()])
    zeros = torch.zeros(B, S, dtype=torch.long)
    return OmniMicrobatch(tokens=zeros, labels=zeros, loss_mask=loss_mask.float(), position_ids=torch.zeros(3, B, S,
                          dtype=torch.long), cu_seqlens=cu, modality=PREFERENCE)


def test_preference_loss_is_dpo_of_the_packed_pairs():
    """The trainer's path (training/tasks/alignment.py): megatron's per-token loss of a packed preference row
    -> per-sample log-probs (response tokens only) -> Eq. 7, against the formula written out by hand."""
    # Row 0: chosen = tokens 0..3 (response 1..2), rejected = 4..6 (response 5..6), padding 7.
    # Row 1: chosen = tokens 0..1 (response 1), rejected = 2..7 (response 4..7).
    per_token_loss = torch.tensor([[0.5, 1.0, 2.0, 9.0, 3.0, 0.25, 0.5, 4.0],
                                   [7.0, 1.5, 0.5, 6.0, 1.0, 0.5, 0.25, 0.25]], requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 0], [0, 1, 0, 0, 1, 1, 1, 1]])
    batch = _preference_microbatch(per_token_loss, mask, [[4, 3, 1], [2, 6]])
    policy = torch.tensor([[-3.0, -0.75], [-1.5, -2.0]])  # (chosen, rejected) = -sum of response losses
    torch.testing.assert_close(pair_logprobs(batch, per_token_loss), policy)

    # The reference pass only reports its log-probs.
    _, pairs, reports = preference_loss(PlannedPair(batch), per_token_loss)
    assert int(pairs) == 2
    torch.testing.assert_close(reports["ref_logps"], policy)

    ref = torch.tensor([[-3.5, -0.5], [-1.0, -2.5]])
    beta, scale = 0.5, 1.7
    loss, pairs, reports = preference_loss(PlannedPair(batch, loss_scale=scale, ref_logps=ref, dpo_beta=beta),
                                           per_token_loss)
    # Eq. 7 per pair: -log sigmoid(beta * ((pc - rc) - (pr - rr))); margins 0.5*(0.5+0.25) and 0.5*(-0.5-0.5)
    margins = [beta * ((-3.0 + 3.5) - (-0.75 + 0.5)), beta * ((-1.5 + 1.0) - (-2.0 + 2.5))]
    expected = [math.log1p(math.exp(-m)) for m in margins]
    # The microbatch returns the pairs' loss sum, scaled by the step plan; megatron divides by all pairs.
    assert loss.item() == pytest.approx(scale * sum(expected), rel=1e-6)
    assert int(pairs) == 2
    assert reports[DPO_LOSS].tolist() == pytest.approx([sum(expected), 2.0])
    assert reports[DPO_ACCURACY].tolist() == pytest.approx([1.0, 2.0])  # one pair of two prefers chosen
    # Gradient: only response tokens carry it.
    loss.backward()
    sig = [1 / (1 + math.exp(m)) for m in margins]
    grad = torch.zeros(2, 8)
    # (d loss / d logp_chosen = -beta * sigmoid(-margin) * scale, and logp = -sum of the response's losses)
    grad[0, [1, 2]] = beta * sig[0] * scale
    grad[0, [5, 6]] = -beta * sig[0] * scale
    grad[1, [1]] = beta * sig[1] * scale
    grad[1, [4, 5, 6, 7]] = -beta * sig[1] * scale
    torch.testing.assert_close(per_token_loss.grad, grad)


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
