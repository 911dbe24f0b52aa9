"""The Llama-3 backbone as megatron-core `GPTModel` chunks (one per virtual pipeline stage)."""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_omni.config.schema import ModelConfig, ParallelConfig
from megatron_omni.models.kernels import Kernels, detect_kernels, megatron_softmax_kernels, weight_gradient_fusion

log = logging.getLogger(__name__)


def transformer_config(
    model: ModelConfig, parallel: ParallelConfig, params_dtype: torch.dtype, kernels: Kernels,
    mrope_section: Optional[Sequence[int]] = None,
) -> TransformerConfig:
    """Map our typed model/parallel config onto megatron-core's TransformerConfig (Llama-3 architecture).

    `mrope_section`: the attention rotates with M-RoPE freqs (the omni model): megatron's
    `TransformerConfig.mrope_section` is set and TE's fused RoPE is off -- its bshd kernel takes
    per-position freqs and broadcasts them over the batch, M-RoPE's are per token."""
    fused = kernels.cuda  # jit/TE fusions only exist with CUDA
    rope_fusion = kernels.transformer_engine and mrope_section is None
    if kernels.transformer_engine and not rope_fusion:
        log.info("M-RoPE: apply_rope_fusion off (TE's fused RoPE takes per-position freqs; M-RoPE's are per "
                 "token), megatron's unfused rotation runs")
    fp8 = {}
    if model.fp8 is not None:
        fp8 = dict(
            fp8=model.fp8,
            fp8_recipe=model.fp8_recipe,
            fp8_amax_history_len=model.fp8_amax_history_len,
            fp8_amax_compute_algo=model.fp8_amax_compute_algo,
        )
    moe = {}
    if model.moe is not None:
        from megatron_omni.models.moe.spec import moe_transformer_fields

        moe = moe_transformer_fields(model.moe)
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,  # SwiGLU: fc1 holds [gate; up]
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        attention_dropout=model.attention_dropout,
        hidden_dropout=model.hidden_dropout,
        init_method_std=model.init_method_std,
        # Kept on although models/init.py redraws every weight: megatron sets the
        # tensor_model_parallel/partition_dim attributes (used by grad-norm and sharded
        # checkpoints) only inside its init functions.
        perform_initialization=True,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        context_parallel_size=parallel.cp,
        cp_comm_type=model.cp_comm_type if parallel.cp > 1 else None,
        expert_model_parallel_size=parallel.ep,
        sequence_parallel=parallel.sequence_parallel,
        num_layers_in_first_pipeline_stage=parallel.first_stage_num_layers,
        num_layers_in_last_pipeline_stage=parallel.last_stage_num_layers,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # Loss is summed over tokens and divided by the global token count once, so the step
        # is the same mean-token loss at every DP/PP/microbatch split.
        calculate_per_token_loss=True,
        masked_softmax_fusion=fused and megatron_softmax_kernels(),
        bias_activation_fusion=fused,
        bias_dropout_fusion=fused,
        apply_rope_fusion=rope_fusion,
        mrope_section=list(mrope_section) if mrope_section is not None else None,
        gradient_accumulation_fusion=weight_gradient_fusion(),
        persist_layer_norm=kernels.transformer_engine,
        cross_entropy_loss_fusion=fused,
        recompute_granularity=model.recompute_granularity,
        recompute_method=model.recompute_method,
        recompute_num_layers=model.recompute_num_layers,
        deterministic_mode=model.deterministic_mode,
        **fp8,
        **moe,
    )


def layer_spec(kernels: Kernels, model: Optional[ModelConfig] = None) -> ModuleSpec:
    if model is not None and model.moe is not None:
        from megatron_omni.models.moe.spec import moe_layer_spec

        return moe_layer_spec(model.moe, kernels)
    if kernels.transformer_engine:
        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_local_spec(normalization="RMSNorm")


def gpt_model_kwargs(
    model: ModelConfig, parallel: ParallelConfig, *, seq_length: int, params_dtype: torch.dtype,
    vocab_size: Optional[int] = None, mrope_section: Optional[Sequence[int]] = None,
) -> List[dict]:
    """GPTModel constructor arguments of this rank's chunk(s); with virtual pipelining, one per
    virtual stage (one TransformerConfig and layer spec, shared).  `vocab_size` overrides
    `model.vocab_size` (the omni model's extended vocabulary); `mrope_section`: see `transformer_config`."""
    kernels = detect_kernels(model.transformer_impl)
    if model.deterministic_mode:  # process-wide, like the seeds: a non-deterministic torch kernel then raises
        torch.use_deterministic_algorithms(True)
    config = transformer_config(model, parallel, params_dtype, kernels, mrope_section)
    spec = layer_spec(kernels, model)
    vocab = model.padded_vocab_size(parallel.tp, vocab_size)
    out = []
    for vp_stage in range(parallel.vpp or 1):
        vp: Optional[int] = vp_stage if parallel.vpp else None
        out.append(dict(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=vocab,
            max_sequence_length=seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            parallel_output=True,
            share_embeddings_and_output_weights=model.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(model.rotary_base),
            rope_scaling=model.rope_scaling,
            rope_scaling_factor=model.rope_scaling_factor,
            vp_stage=vp,
        ))
    return out


def build_llama_chunks(
    model: ModelConfig, parallel: ParallelConfig, *, seq_length: int, params_dtype: torch.dtype
) -> List[GPTModel]:
    """Build this rank's GPTModel chunk(s); with virtual pipelining, one per virtual stage."""
    chunks = [GPTModel(**kw) for kw in gpt_model_kwargs(model, parallel, seq_length=seq_length, params_dtype=params_dtype)]
    for chunk in chunks:  # the real vocabulary: generation never samples the TP padding rows
        chunk.real_vocab_size = model.vocab_size
    return chunks
