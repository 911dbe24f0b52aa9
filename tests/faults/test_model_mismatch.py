"""A checkpoint of another model size is one error naming the reshaped tensors and the fix, before
anything is loaded (training/checkpoint.py `_check_model_matches`)."""

from __future__ import annotations

import pytest

from megatron_omni.config import load_config
from megatron_omni.training.checkpoint import load_checkpoint
from megatron_omni.training.loop import build_train_state
from tests.training.conftest import one_rank_world  # noqa: F401  (fixture)


def test_a_checkpoint_of_another_model_size_is_refused(one_rank_world, four_checkpoints):  # noqa: F811
    state = build_train_state(load_config("configs/tiny/llm.yaml", ["model.ffn_hidden_size=192"]))  # tiny: 176
    with pytest.raises(RuntimeError) as err:
        load_checkpoint(state, str(four_checkpoints / "checkpoints"))
    message = str(err.value)
    assert "iter_0000004: checkpoint does not match the model" in message
    assert "0 tensors missing [], 1 with another shape ['decoder.layers.mlp.linear_fc2.weight (4, 64, 176) -> " \
           "(4, 64, 192)']" in message, message
    assert "its run directory's config.yaml has the model section it needs" in message
    assert state.step == 0  # nothing was loaded
