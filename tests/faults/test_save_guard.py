"""A checkpoint is never written with NaN/Inf parameters or optimizer state (training/guards.py
`parameters_finite`, checked by `save_checkpoint` before anything is written)."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_omni.config import load_config
from megatron_omni.training.checkpoint import _prime_torch_adam_state, save_checkpoint
from megatron_omni.training.guards import NonFiniteError, _optimizer_state_tensors
from megatron_omni.training.loop import build_train_state
from tests.training.conftest import one_rank_world  # noqa: F401  (fixture)


@pytest.mark.parametrize("where", ["parameter", "optimizer state"])
def test_a_nonfinite_model_or_optimizer_is_not_saved(one_rank_world, tmp_path, where):  # noqa: F811
    state = build_train_state(load_config("configs/tiny/llm.yaml", ["train.precision=bf16"]))
    _prime_torch_adam_state(state.optimizer)  # the Adam moments a trained run has
    with torch.no_grad():
        if where == "parameter":
            next(state.model[0].parameters()).view(-1)[3] = float("inf")
        else:
            next(iter(t for t in _optimizer_state_tensors(state.optimizer) if t.numel() > 1)).view(-1)[0] = float("nan")
    state.step = 7
    with pytest.raises(NonFiniteError, match="step 7: the model has NaN/Inf parameters or optimizer state; refusing"):
        save_checkpoint(state, str(tmp_path / "checkpoints"))
    assert not os.path.exists(tmp_path / "checkpoints" / "iter_0000007")
