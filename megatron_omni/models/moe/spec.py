"""The MoE GPT layer: megatron's MoE layer spec with the null-expert router, and the
TransformerConfig `moe_*` fields for a `model.moe` section."""

from __future__ import annotations

import functools
import logging
from typing import Any, Dict

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_omni.models.kernels import Kernels
from megatron_omni.config.moe import MoEConfig
from megatron_omni.models.moe.router import NullExpertRouter, NullRoutingOptions

log = logging.getLogger(__name__)


def moe_transformer_fields(moe: MoEConfig) -> Dict[str, Any]:
    """megatron TransformerConfig keyword arguments for `moe` (merged into the dense ones)."""
    return dict(
        num_moe_experts=moe.num_experts,
        moe_ffn_hidden_size=moe.ffn_hidden_size,
        moe_router_topk=moe.router_topk,
        moe_router_pre_softmax=moe.router_pre_softmax,
        moe_router_topk_scaling_factor=moe.router_topk_scaling_factor,
        moe_router_load_balancing_type="aux_loss" if moe.aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=moe.aux_loss_coeff,
        moe_z_loss_coeff=moe.z_loss_coeff,
        moe_router_dtype="fp32",
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
        moe_shared_expert_gate=moe.shared_expert_gate,
        moe_token_dispatcher_type=moe.token_dispatcher_type,
        moe_expert_capacity_factor=moe.capacity_factor,
        moe_token_drop_policy=moe.token_drop_policy,
        moe_pad_expert_input_to_capacity=moe.pad_expert_input_to_capacity,
        # The unfused permute sizes its output from the routing map; TE's fused one assumes
        # tokens x k rows, which null experts and top-p make wrong.
        moe_permute_fusion=False,
    )


def uses_grouped_gemm(moe: MoEConfig, kernels: Kernels) -> bool:
    """TE grouped GEMM (TEGroupedMLP) with Transformer Engine; one GEMM per expert otherwise."""
    return moe.grouped_gemm and kernels.transformer_engine


def moe_layer_spec(moe: MoEConfig, kernels: Kernels) -> ModuleSpec:
    """megatron's GPT layer spec with an MoE MLP whose router is `NullExpertRouter`."""
    grouped = uses_grouped_gemm(moe, kernels)
    if kernels.transformer_engine:
        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=moe.num_experts, moe_grouped_gemm=grouped)
    else:
        spec = get_gpt_layer_local_spec(num_experts=moe.num_experts, moe_grouped_gemm=False, normalization="RMSNorm")
    options = NullRoutingOptions(
        num_null_experts=moe.num_null_experts, router_type=moe.router_type, router_topp=moe.router_topp
    )
    spec.submodules.mlp.submodules.router = functools.partial(NullExpertRouter, options=options)
    log.info(
        "MoE layers: %d routed experts (%s, k=%d%s) + %d null + shared %s; experts run as %s",
        moe.num_experts, moe.router_type, moe.router_topk,
        f", p={moe.router_topp}" if moe.router_type == "topp" else "", moe.num_null_experts,
        moe.shared_expert_ffn_hidden_size, "TE grouped GEMM" if grouped else "one GEMM per expert (SequentialMLP)",
    )
    return spec
