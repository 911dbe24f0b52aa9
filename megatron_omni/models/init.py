"""Layout-invariant weight initialisation.

megatron initialises each rank's shard from RNG streams that depend on the TP/PP
layout, so a TP2xPP2 run and a single-rank run with the same seed start from
different weights.  Here every parameter is drawn as the *full, unsharded* tensor
from a generator seeded by (seed, global parameter name) and the rank keeps its TP
slice: the same seed gives bit-identical weights at every TP/PP/VPP layout, which
is what makes "parallel run == single-rank run" testable, and reproducible for users.

The distributions are megatron's defaults for GPT: N(0, std) for embeddings, QKV,
fc1 and the output layer; N(0, std/sqrt(2L)) for the residual projections
(linear_proj, linear_fc2); ones for RMSNorm weights.  Rows of the vocabulary
padding start at zero so they do not depend on the (TP-dependent) amount of padding.
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Iterable, Optional, Tuple

import torch
from megatron.core import parallel_state

from megatron_omni.config.schema import ModelConfig
from megatron_omni.parallel import layout

_RESIDUAL_OUTPUTS = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
_VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")
# MoE: every expert's fc2 (routed, shared; TE grouped GEMM names end in weight{i}) is a residual output.
_EXPERT_FC2 = re.compile(r".*\.mlp\.(experts|shared_experts)\..*linear_fc2\.weight\d*$")


def _is_residual_output(name: str) -> bool:
    return name.endswith(_RESIDUAL_OUTPUTS) or bool(_EXPERT_FC2.match(name))


def _draw_full(param: torch.Tensor, full_shape, seed: int, seed_name: str, std: float, rows=None) -> torch.Tensor:
    gen = torch.Generator(device=param.device)
    gen.manual_seed(zlib.crc32(f"{seed}:{seed_name}".encode()))
    full = torch.zeros(full_shape, dtype=torch.float32, device=param.device)
    full[: full_shape[0] if rows is None else rows].normal_(0.0, std, generator=gen)
    return full


@torch.no_grad()
def init_weights_layout_invariant(
    chunks: Iterable[torch.nn.Module], model: ModelConfig, seed: int, *, vocab_size: Optional[int] = None,
    skip_prefixes: Tuple[str, ...] = (),
) -> None:
    """The backbone's weights (`vocab_size`: real vocabulary rows, default `model.vocab_size`);
    parameters under `skip_prefixes` (e.g. the omni encoders) are left to their own rule."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    residual_std = model.init_method_std / math.sqrt(2.0 * model.num_layers)
    for chunk in chunks:
        gated = layout.gated_fc1_weights(chunk)
        for name, param in layout.global_named_parameters(chunk):
            if skip_prefixes and name.startswith(skip_prefixes):
                continue
            full_shape = layout.full_shape(param, tp)
            if name.endswith("layernorm.weight") or name.endswith("final_layernorm.weight"):
                param.fill_(1.0)
                continue
            if param.dim() < 2:
                raise RuntimeError(f"no initialisation rule for parameter {name} {tuple(param.shape)}")
            std = residual_std if _is_residual_output(name) else model.init_method_std
            # A tied output layer (last stage copy with PP > 1) starts as the embedding.
            seed_name = _VOCAB_PARAMS[0] if model.tie_word_embeddings and name.endswith(_VOCAB_PARAMS) else name
            rows = (vocab_size or model.vocab_size) if name.endswith(_VOCAB_PARAMS) else None  # padding rows stay 0
            full = _draw_full(param, full_shape, seed, seed_name, std, rows)
            param.copy_(layout.shard(full, param, tp, rank, gated=id(param) in gated))


@torch.no_grad()
def init_encoder_layout_invariant(module: torch.nn.Module, prefix: str, std: float, seed: int) -> None:
    """An encoder's weights, layout-invariant like the backbone's: matrices / convolutions
    N(0, std) drawn full from (seed, prefix + name) then TP-sliced; norm weights 1; biases 0.
    Parameters that do not train (e.g. Whisper's fixed sinusoidal positions) keep their values."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    gated = layout.gated_fc1_weights(module)
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if param.dim() == 1:
            param.fill_(0.0 if name.endswith("bias") else 1.0)
            continue
        full = _draw_full(param, layout.full_shape(param, tp), seed, prefix + name, std)
        param.copy_(layout.shard(full, param, tp, rank, gated=id(param) in gated))
