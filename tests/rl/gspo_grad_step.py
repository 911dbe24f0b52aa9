"""One GSPO step of the tiny stage through the training path -- `build_train_state` (DDP, frozen
encoders), the stage's rollouts (`GSPOData.step_iterators`: `generate` on the training ranks,
rewards, advantages, rollout microbatches), megatron's forward-backward schedule with the GSPO loss
function and DDP's gradient finalisation -- returning the loss and the full (un-sharded) gradients
on global rank 0.  The same function runs at TP2 x PP2 (inside tests/convert/generate_world.py's
4-rank world) and on one rank (in the test process); the test compares them.

An untrained policy earns no reward (every advantage 0, the loss and the gradients exactly 0), so
after the rollouts the advantages are replaced by seeded normal draws and pi_old is moved by seeded
noise on the response tokens (some sequences then fall outside GSPO's clip range): a function of
the microbatch index only, so every layout gets the same numbers.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

GSPO_STEP_OVERRIDES = (
    "gspo.group_size=2", "gspo.minibatches=1", "gspo.max_new_tokens=6",
    "train.global_batch_size=8", "train.micro_batch_size=2",  # 4 prompts x G=2 rollouts, 4 microbatches
)


def gspo_step_config(demo_root: str, output_dir: str, layout: Sequence[str] = ()):
    from megatron_omni.config import load_config

    return load_config("configs/tiny/stages/gspo.yaml", [
        f"data.root={demo_root}", f"train.output_dir={output_dir}", *GSPO_STEP_OVERRIDES, *layout])


def perturb(planned) -> None:
    """Seeded advantages and pi_old moved off pi_theta, per microbatch index (layout-independent)."""
    for j, p in enumerate(planned):
        g = torch.Generator().manual_seed(1000 + j)
        m = p.batch.loss_mask.bool()
        p.rollout.advantages = torch.randn(p.rollout.advantages.shape, generator=g)
        p.rollout.old_logp = p.rollout.old_logp + torch.where(m, 2e-3 * torch.randn(m.shape, generator=g), 0.0)


def gspo_grad_step(cfg) -> Optional[Dict[str, object]]:
    """{loss, clip_fraction, tokens (the rollout microbatches' ids), grads} on rank 0, None elsewhere."""
    from megatron_omni.parallel.layout import gather_full_model, unwrap
    from megatron_omni.rl.stage import build_gspo_data
    from megatron_omni.training.loop import build_train_state, num_microbatches
    from megatron_omni.training.step import run_schedule

    state = build_train_state(cfg)
    n_micro = num_microbatches(cfg)
    data = build_gspo_data(cfg, unwrap(state.model[0]).vocab, len(state.model), n_micro)
    planned = list(data.step_iterators(0, state.model)[0])
    perturb(planned)
    for chunk in state.model:
        chunk.zero_grad_buffer()
    losses = run_schedule(state.model, [iter(planned) for _ in state.model], num_microbatches=n_micro,
                          seq_length=cfg.data.seq_length, micro_batch_size=cfg.train.micro_batch_size,
                          forward_only=False, forward_step_func=data.forward_step_func)
    metrics = data.step_metrics(losses)
    grads = gather_full_model(state.model, grads=True)
    if grads is None:
        return None
    return {"loss": metrics["gspo_loss"], "clip_fraction": metrics["clip_fraction"], "grads": grads,
            "tokens": torch.cat([p.batch.tokens for p in planned]), "rollouts": metrics["rollouts"],
            "modalities": sorted(metrics["reward_mean_by_modality"])}
