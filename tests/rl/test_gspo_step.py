"""A GSPO step of the stage (rollouts by `generate` on the policy with their log-probs, rewards,
advantages, rollout microbatches, the GSPO loss through the omni forward step) equals the paper's formula applied to
log-probs taken independently from the same model's logits (float64 log-softmax over the padded
vocabulary): loss and every parameter gradient.  One process, world of one."""

from __future__ import annotations

import statistics

import pytest
import torch

EPS = (3e-4, 4e-4)


def _toy_blend(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text("stage: toy\nvalidation: {text: 2}\nsources:\n"
                    "  - {name: rlqa_text, manifest: manifests/rlqa_text.jsonl, modality: text,"
                    " rewards: {numeric: 1.0, format: 0.1}}\n")
    return str(path)


def test_gspo_step_equals_paper_formula_on_model_logprobs(demo_data, tmp_path):
    from megatron_omni.config import load_config
    from megatron_omni.convert.mcore_io import megatron_world
    from megatron_omni.models.omni import build_omni_chunks, init_omni_weights_layout_invariant
    from megatron_omni.rl.loss import GSPO_CLIP_FRACTION
    from megatron_omni.rl.stage import build_gspo_data
    from megatron_omni.rl.forward_step import gspo_forward_step
    from megatron_omni.training.stage_inputs import stage_inputs
    from tests.rl.test_gspo_loss import _paper_loss

    cfg = load_config("configs/tiny/stages/gspo.yaml", [
        f"data.root={demo_data}", f"data.omni_blend={_toy_blend(tmp_path)}", "data.seq_length=144",
        "gspo.group_size=4", "gspo.minibatches=1", "gspo.max_new_tokens=6", "train.global_batch_size=8",
        "train.micro_batch_size=4", f"train.output_dir={tmp_path}"])
    with megatron_world():
        chunks = build_omni_chunks(cfg.model, cfg.parallel, cfg.omni, seq_length=cfg.data.seq_length,
                                   params_dtype=torch.float32)
        init_omni_weights_layout_invariant(chunks, cfg.model, cfg.omni, cfg.train.seed)
        model = chunks[0]
        data = build_gspo_data(cfg, model.vocab, num_chunks=1, num_microbatches=2)
        planned = list(data.step_iterators(0, chunks)[0])
        assert len(planned) == 2 and data._rollout_metrics["rollouts"] == 8
        # pi_old from the rollout pass (generate's log-probs, before any update: theta = theta_old) ...
        rollout_old = torch.cat([p.rollout.old_logp for p in planned]).double()
        computed_adv = torch.cat([p.rollout.advantages for p in planned]).double()
        g = torch.Generator().manual_seed(0)
        for p in planned:  # ... moved a little, per token, to put some sequences outside the clip range,
            m = p.batch.loss_mask.bool()  # and give every rollout an advantage (an untrained policy earns no reward)
            p.rollout.old_logp = p.rollout.old_logp + torch.where(m, 2e-3 * torch.randn(m.shape, generator=g), 0.0)
            p.rollout.advantages = torch.randn(p.rollout.advantages.shape, generator=g)
        params = [q for q in model.parameters() if q.requires_grad]

        # the stage's way: omni forward step + GSPO loss function; megatron divides by the sequence count
        model.zero_grad(set_to_none=True)
        total, count, clipped = 0.0, 0, 0.0
        losses = []
        for p in planned:
            output, loss_func = gspo_forward_step(iter([p]), model)
            loss_sum, n, reports = loss_func(output)
            losses.append(loss_sum)
            count += int(n)
            clipped += float(reports[GSPO_CLIP_FRACTION][0])
        stage_loss = sum(losses) / count
        stage_loss.backward()
        stage_grads = [torch.zeros_like(q) if q.grad is None else q.grad.detach().clone() for q in params]

        # the paper's formula on log-probs from the model's logits, advantages from the rewards' groups
        model.zero_grad(set_to_none=True)
        logps, olds, advs, masks = [], [], [], []
        for p in planned:
            batch, mask, packed = stage_inputs(p.batch, {}, model)
            logits = model(batch.tokens, batch.position_ids, mask, labels=None, packed_seq_params=packed,
                           pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
                           audio_features=None, audio_lengths=None, placeholder_counts=p.batch.count_placeholders(model.vocab.placeholder_ids))
            lp = torch.log_softmax(logits.double(), dim=-1).gather(-1, batch.labels[..., None]).squeeze(-1)
            logps.append(lp)
            olds.append(p.rollout.old_logp.double())
            advs.append(p.rollout.advantages.double())
            masks.append(p.batch.loss_mask.bool())
        logp, old, adv, mask = torch.cat(logps), torch.cat(olds), torch.cat(advs), torch.cat(masks)
        # generate()'s log-probs of the sampled tokens are the training forward's (fp32)
        assert float((rollout_old - logp.detach())[mask].abs().max()) < 1e-5
        paper = _paper_loss(logp, old, adv, mask, *EPS)
        paper.backward()
        paper_grads = [torch.zeros_like(q) if q.grad is None else q.grad.detach().clone() for q in params]

    assert abs(stage_loss.item() - paper.item()) < 1e-6, (stage_loss.item(), paper.item())
    assert 0 < clipped < count  # both sides of the clip are exercised
    worst = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in zip(stage_grads, paper_grads))
    assert worst < 1e-5
    assert any(float(gr.abs().max()) > 0 for gr in stage_grads)
    # advantages: each prompt's 4 rollouts, (r - mean) / (sample std + eps), from the logged rewards
    rewards = data.last_rewards
    for k in range(0, 8, 4):
        grp = rewards[k:k + 4]
        sd = statistics.stdev(grp) if len(set(grp)) > 1 else 0.0
        want = [(r - statistics.fmean(grp)) / (sd + cfg.gspo.advantage_eps) for r in grp]
        assert computed_adv[k:k + 4].tolist() == pytest.approx(want, abs=1e-5)
