"""The megatron TransformerConfig shared by the bidirectional encoders (ViT, audio).

Both are pre-norm LayerNorm transformers with biases, multi-head attention and a
non-gated MLP; both live whole on the first pipeline stage (pipeline size 1, no
sequence parallelism) and take TP from the world.  Callers pass what differs
(activation, fusions) as keyword overrides.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig


def bidirectional_encoder_config(
    *,
    num_layers: int,
    hidden_size: int,
    ffn_hidden_size: int,
    num_attention_heads: int,
    kv_channels: int,
    layernorm_epsilon: float,
    activation_func: Callable,
    attention_dropout: float,
    hidden_dropout: float,
    init_method_std: float,
    params_dtype: torch.dtype = torch.float32,
    tp: Optional[int] = None,
    recompute: bool = False,
    **overrides: Any,
) -> TransformerConfig:
    if tp is None:
        tp = parallel_state.get_tensor_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
    fields = dict(
        num_layers=num_layers,
        hidden_size=hidden_size,
        ffn_hidden_size=ffn_hidden_size,
        num_attention_heads=num_attention_heads,
        num_query_groups=num_attention_heads,  # MHA
        kv_channels=kv_channels,
        normalization="LayerNorm",
        layernorm_epsilon=layernorm_epsilon,
        gated_linear_unit=False,
        activation_func=activation_func,
        add_bias_linear=True,
        add_qkv_bias=True,
        attention_dropout=attention_dropout,
        hidden_dropout=hidden_dropout,
        init_method_std=init_method_std,
        perform_initialization=True,  # also sets megatron's TP attributes on the weights
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        persist_layer_norm=False,
    )
    if recompute:
        # Full recompute keeps only each block's input (2 bytes x width per token) for the
        # backward: a trainable encoder's activations otherwise dominate the first pipeline
        # stage's memory (tools/plan.py prices both).
        fields.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    fields.update(overrides)
    return TransformerConfig(**fields)
