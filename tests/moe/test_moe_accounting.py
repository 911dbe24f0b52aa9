"""MoE config checks, FLOPs and planner parameter counts: only computed experts cost FLOPs."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_omni.config import ConfigError, load_config, validate
from megatron_omni.config.loader import load_section_file
from megatron_omni.config.schema import ModelConfig
from megatron_omni.config.moe import MoEConfig
from megatron_omni.planner.layout import Layout
from megatron_omni.planner.memory import param_counts, stage_params_per_gpu
from megatron_omni.planner.search import ep_choices
from megatron_omni.training import flops as F
from tests.moe.moe_helpers import TINY_RUN


def test_moe_mlp_flops_count_shared_plus_expected_routed():
    model = load_config(TINY_RUN).model
    moe = model.moe
    h, T = model.hidden_size, 1000
    # Independent count: SwiGLU = 3 GEMMs of h x width, 2 FLOPs per MAC; the shared expert on every
    # token, each of the k routed slots computed unless it picked one of the N null experts, whose
    # expected share under uniform routing is N / (E + N).
    routed_per_token = moe.router_topk * (1 - moe.num_null_experts / (moe.num_experts + moe.num_null_experts))
    expected = 2 * T * h * 3 * (moe.shared_expert_ffn_hidden_size + routed_per_token * moe.ffn_hidden_size)
    assert F.decoder_mlp_forward_flops(model, T) == pytest.approx(expected)
    dense = dataclasses.replace(model, moe=None)
    assert F.decoder_mlp_forward_flops(dense, T) == pytest.approx(2 * T * h * 3 * model.ffn_hidden_size)
    # Whole-model totals differ exactly by the MLP difference, per layer.
    diff = F.llm_forward_flops(model, [T]) - F.llm_forward_flops(dense, [T])
    assert diff == pytest.approx(model.num_layers * (expected - 2 * T * h * 3 * model.ffn_hidden_size))
    # A measured null rate replaces the uniform prior; no null experts = k full experts.
    more_null = dataclasses.replace(model, moe=dataclasses.replace(moe, expected_null_rate=0.5))
    assert F.decoder_mlp_forward_flops(more_null, T) < F.decoder_mlp_forward_flops(model, T)
    no_null = dataclasses.replace(model, moe=dataclasses.replace(moe, num_null_experts=0))
    assert no_null.moe.routed_experts_per_token() == moe.router_topk


def test_planner_params_split_experts_over_ep():
    model = load_section_file(ModelConfig, "configs/model/qwen2_5_7b_moe.yaml")
    h, E, f = model.hidden_size, model.moe.num_experts, model.moe.ffn_hidden_size
    pc = param_counts(model, tp=1)
    assert pc.layer_experts == E * 3 * h * f
    assert 25e9 < pc.total < 35e9  # the config's "~30B parameters"
    one = stage_params_per_gpu(model, Layout(tp=2, pp=4, ep=1), rank=1)["linear"]
    two = stage_params_per_gpu(model, Layout(tp=2, pp=4, ep=2), rank=1)["linear"]
    assert one - two == (model.num_layers // 4) * pc.layer_experts // 4  # half the experts leave each GPU
    assert list(ep_choices(model)) == [1, 2, 4]


@pytest.mark.parametrize("overrides, message", [
    (["parallel.ep=3"], "num_experts=4 is not divisible by parallel.ep=3"),
    (["model.moe.router_topk=7"], "router_topk=7 must be in [1"),
    (["model.moe.router_type=topq"], "router_type='topq' is not one of"),
    (["parallel.tp=2"], "sequence_parallel=true"),
    (["model.moe.shared_expert_ffn_hidden_size=null", "model.moe.shared_expert_gate=true"], "shared_expert_gate"),
])
def test_bad_moe_configs_name_the_fix(overrides, message):
    cfg = load_config(TINY_RUN, ["train.global_batch_size=48", *overrides])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        validate(cfg, world_size=12)


def test_ep_needs_moe_and_unknown_keys_are_rejected():
    with pytest.raises(ConfigError, match="parallel.ep=2 needs an MoE model"):
        validate(load_config("configs/tiny/llm.yaml", ["parallel.ep=2"]), world_size=2)
    with pytest.raises(ConfigError, match="did you mean 'num_null_experts'"):
        load_config(TINY_RUN, ["model.moe.num_nul_experts=1"])
    cfg = load_config("configs/tiny/llm.yaml", ["model.moe.num_experts=2"])  # a moe section from an override
    assert cfg.model.moe == MoEConfig(num_experts=2)
