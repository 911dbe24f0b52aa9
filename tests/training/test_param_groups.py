"""The per-module parameter-group hook reaches megatron's optimizer (later stages give encoders their own LR)."""

from __future__ import annotations

import pytest
from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.optimizer_param_scheduler import ParamGroupOverride

from megatron_omni.config import load_config
from megatron_omni.training.loop import build_train_state


def test_hook_gives_matching_parameters_their_own_lr(one_rank_world):
    cfg = load_config("configs/tiny/llm.yaml", ["optimizer.lr_warmup_steps=0", "optimizer.lr=1e-3"])

    def hook(_cfg):
        return {ParamKey(name="*output_layer*"): ParamGroupOverride(max_lr=1e-5, min_lr=1e-6)}

    state = build_train_state(cfg, param_group_hook=hook)
    groups = state.optimizer.param_groups
    by_lr = {}
    for g in groups:
        by_lr.setdefault(g["max_lr"], 0)
        by_lr[g["max_lr"]] += sum(p.numel() for p in g["params"])
    vocab, hidden = cfg.model.padded_vocab_size(), cfg.model.hidden_size
    assert by_lr[1e-5] == vocab * hidden  # exactly the output layer
    assert by_lr[1e-3] > 0
    state.scheduler.step(increment=1)
    lrs = {g["max_lr"]: g["lr"] for g in state.optimizer.param_groups}
    assert lrs[1e-5] < lrs[1e-3]  # the scheduler anneals each group from its own max


def test_omni_encoders_get_the_encoder_lr(one_rank_world):
    """Paper Table 2 (PT-2): LR 1e-5, LR of encoders 1e-6 -- the connectors stay on the main LR."""
    from megatron_omni.models.omni import module_of
    from megatron_omni.parallel.layout import unwrap

    cfg = load_config("configs/tiny/omni_mock.yaml", ["optimizer.lr_warmup_steps=0", "optimizer.lr=1e-5",
                                                      "optimizer.min_lr=1e-6", "optimizer.encoder_lr=1e-6"])
    state = build_train_state(cfg)
    model = unwrap(state.model[0])
    expected = sum(p.numel() for n, p in model.named_parameters()
                   if p.requires_grad and module_of(n) in ("vision_encoder", "audio_encoder"))
    by_lr = {}
    for g in state.optimizer.param_groups:
        by_lr[g["max_lr"]] = by_lr.get(g["max_lr"], 0) + sum(p.numel() for p in g["params"])
    assert by_lr[1e-6] == expected > 0
    assert by_lr[1e-5] == sum(p.numel() for p in model.parameters() if p.requires_grad) - expected
    assert all(g["min_lr"] == pytest.approx(1e-7) for g in state.optimizer.param_groups if g["max_lr"] == 1e-6)
