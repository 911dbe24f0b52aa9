"""A weights-only load (a stage's `train.pretrained_checkpoint`, `train.finetune`) in bf16: the
optimizer's fp32 main copies of the weights must follow the loaded weights, or the first optimizer
step writes the random init back over them (every bf16 stage of the recipe restarted from scratch)."""

from __future__ import annotations

import pytest
import torch

from megatron_omni.config import load_config
from megatron_omni.training.checkpoint import load_checkpoint, save_checkpoint
from megatron_omni.training.loop import build_train_state


@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_first_step_after_a_weights_only_load_keeps_the_loaded_weights(one_rank_world, tmp_path,
                                                                       distributed_optimizer):
    cfg = load_config("configs/tiny/llm.yaml", ["train.precision=bf16", f"train.output_dir={tmp_path}",
                                                f"parallel.use_distributed_optimizer={distributed_optimizer}"])
    state = build_train_state(cfg)
    params = {f"{i}.{n}": p for i, chunk in enumerate(state.model) for n, p in chunk.named_parameters()}
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    null_step(state)  # optimizer state exists before a save, as in training
    with torch.no_grad():  # "trained" weights that differ from the optimizer's fp32 copies of the init
        for p in params.values():
            p.add_(torch.randn_like(p) * 0.1)
    saved = {n: p.detach().clone() for n, p in params.items()}
    save_checkpoint(state, str(tmp_path / "ckpt"))
    with torch.no_grad():
        for p in params.values():
            p.zero_()
    load_checkpoint(state, str(tmp_path / "ckpt"), finetune=True)
    null_step(state)  # the weights it copies back from the fp32 main parameters must be the loaded ones
    changed = [n for n, p in params.items() if not torch.equal(p, saved[n])]
    assert not changed, f"{len(changed)} of {len(params)} parameters lost their loaded value, e.g. {changed[:3]}"


def null_step(state) -> None:
    """One optimizer step that changes nothing itself: zero gradients, lr 0."""
    for chunk in state.model:
        chunk.zero_grad_buffer()
    for group in state.optimizer.param_groups:
        group["lr"] = 0.0
    state.optimizer.step()
