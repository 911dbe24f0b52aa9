"""The per-microbatch loss scale s_i = w_i T / T_i reproduces sum_i w_i grad L_i (Eq. 5 / 7).

Reference: each modality's mean token loss is computed on its own (all its tokens at once, no
microbatches, no DP), differentiated separately, and the gradients are summed with w_i.  The
tested path is what megatron does with calculate_per_token_loss=True: every (DP rank,
microbatch) contributes scale * loss_sum, gradients are summed over ranks and divided once by
the global token count T.
"""

from __future__ import annotations

import torch

from megatron_omni.balance.config import SchedulerConfig
from megatron_omni.balance.loss import (
    all_reduce_modality_tokens,
    local_modality_tokens,
    microbatch_loss_scale,
)
from megatron_omni.balance.scheduler import ModalityRoundScheduler

VOCAB, HIDDEN, SEQ, MBS, DP = 11, 6, 9, 2, 3


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(VOCAB, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, VOCAB))


def _token_losses(model, tokens, labels):
    logits = model(tokens)
    return torch.nn.functional.cross_entropy(logits.view(-1, VOCAB), labels.view(-1), reduction="none").view(labels.shape)


def _batches(plan_modalities, gen):
    """One microbatch per plan entry per DP rank, with modality-dependent mask density so the
    modalities have very different token counts."""
    density = {"image": 0.9, "audio": 0.3, "text": 0.6}
    out = []
    for rank in range(DP):
        rank_mbs = []
        for m in plan_modalities:
            tokens = torch.randint(0, VOCAB, (MBS, SEQ), generator=gen)
            labels = torch.randint(0, VOCAB, (MBS, SEQ), generator=gen)
            mask = (torch.rand(MBS, SEQ, generator=gen) < density[m]).float()
            mask[0, 0] = 1.0
            rank_mbs.append((m, tokens, labels, mask))
        out.append(rank_mbs)
    return out


def test_scaled_microbatch_losses_give_weighted_sum_of_modality_gradients():
    cfg = SchedulerConfig(mode="accumulation", modalities=["image", "audio", "text"], pure_text_share=0.25,
                          step_weights={"image": 0.7, "audio": 6.1, "text": 3.2})
    sched = ModalityRoundScheduler(cfg, num_microbatches=8, seed=3)
    plan = sched.plan(1)
    assert plan.counts() == {"image": 3, "audio": 3, "text": 2}  # several microbatches per modality
    batches = _batches(plan.microbatch_modalities, torch.Generator().manual_seed(1))
    w = plan.modality_weights

    # Token counts known before backward: per rank from the masks, then summed over DP.
    per_rank = [local_modality_tokens([b[0] for b in mbs], [b[3] for b in mbs], cfg.modalities) for mbs in batches]
    global_tokens = {m: sum(c[m] for c in per_rank) for m in cfg.modalities}
    assert len(set(global_tokens.values())) == 3  # different token counts per modality
    total = sum(global_tokens.values())

    # Tested path: megatron's per-token-loss accumulation.
    model = _model()
    for mbs in batches:  # DP ranks: their gradients are summed (all-reduce)
        for m, tokens, labels, mask in mbs:
            loss_sum = (_token_losses(model, tokens, labels) * mask).sum()
            (microbatch_loss_scale(m, global_tokens, w) * loss_sum / total).backward()
    got = [p.grad.clone() for p in model.parameters()]

    # Independent reference: per modality, its mean token loss over all its tokens, own backward.
    ref_model = _model()
    ref = [torch.zeros_like(p) for p in ref_model.parameters()]
    for m in cfg.modalities:
        parts = [b for mbs in batches for b in mbs if b[0] == m]
        tokens = torch.cat([b[1] for b in parts])
        labels = torch.cat([b[2] for b in parts])
        mask = torch.cat([b[3] for b in parts]).bool()
        loss = _token_losses(ref_model, tokens, labels)[mask].mean()
        grads = torch.autograd.grad(loss, list(ref_model.parameters()))
        ref = [r + w[m] * g for r, g in zip(ref, grads)]
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)

    # A plain (unscaled) per-token loss would weight modalities by token count instead: differs.
    plain = _model()
    for mbs in batches:
        for m, tokens, labels, mask in mbs:
            ((_token_losses(plain, tokens, labels) * mask).sum() / total).backward()
    assert not torch.allclose(next(plain.parameters()).grad, ref[0], rtol=1e-3)


def test_absent_modality_and_single_process_reduce():
    counts = {"image": 10, "audio": 0, "text": 5}
    assert microbatch_loss_scale("audio", counts, {"image": 1.0, "audio": 2.0, "text": 1.0}) == 0.0
    assert microbatch_loss_scale("image", counts, {"image": 2.0, "audio": 2.0, "text": 1.0}) == 2.0 * 15 / 10
    assert all_reduce_modality_tokens(counts, None) == counts
