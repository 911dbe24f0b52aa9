"""Where each parameter of the full model lives at a given TP/PP layout.

PP: pipeline stages number their decoder layers from 0 locally; `global_named_parameters`
gives the single-rank name (global layer index) of every local parameter.

TP: how a full (single-rank) tensor maps onto tensor-parallel shards, and back.
One rule set, used by layout-invariant init (full -> shard) and by gradient /
weight gathering (shards -> full).  megatron marks TP-sharded parameters with
`tensor_model_parallel` and `partition_dim`; shards are contiguous chunks along
that dim, except a gated (SwiGLU) fc1 weight, which megatron stores as [gate; up] on
every rank, i.e. rank r holds [gate_r; up_r]; which fc1 weights are gated is read from
the owning MLP's config (`gated_fc1_weights`), not guessed from names.  QKV needs no special case:
megatron orders it by GQA group ([q.., k, v] per group) and TP splits whole groups.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, Iterator, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers down to the model itself."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def global_named_parameters(chunk: torch.nn.Module) -> Iterator[Tuple[str, torch.nn.Parameter]]:
    """named_parameters() of an (unwrapped) chunk with pipeline-local layer indices and
    expert-parallel-local expert indices made global."""
    chunk = unwrap(chunk)
    layers = getattr(getattr(chunk, "decoder", None), "layers", [])
    local_to_global = {str(i): str(layer.layer_number - 1) for i, layer in enumerate(layers)}
    for name, param in chunk.named_parameters():
        # Only the backbone's own decoder is pipeline-split (encoders' blocks keep local names).
        m = re.match(r"(decoder\.layers\.)(\d+)(\..*)", name)
        if m:
            name = m.group(1) + local_to_global[m.group(2)] + m.group(3)
        yield _global_expert_name(chunk, name), param


# MoE experts: SequentialMLP `experts.local_experts.{i}.` and TE grouped GEMM `experts.linear_fcN.weight{i}`.
_LOCAL_EXPERT = re.compile(r"(.*\.experts\.local_experts\.)(\d+)(\..*)|(.*\.experts\.linear_fc[12]\.(?:weight|bias))(\d+)$")


def _global_expert_name(chunk: torch.nn.Module, name: str) -> str:
    """Local expert i on expert-parallel rank r is global expert r * num_local_experts + i."""
    m = _LOCAL_EXPERT.match(name)
    if not m:
        return name
    num_local = unwrap(chunk).config.num_moe_experts // parallel_state.get_expert_model_parallel_world_size()
    offset = parallel_state.get_expert_model_parallel_rank() * num_local
    if m.group(1) is not None:
        return f"{m.group(1)}{int(m.group(2)) + offset}{m.group(3)}"
    return f"{m.group(4)}{int(m.group(5)) + offset}"


def is_expert_parallel(param: torch.Tensor) -> bool:
    """megatron marks parameters that differ across expert-parallel ranks with allreduce=False."""
    return not getattr(param, "allreduce", True)


def is_tp_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def gated_fc1_weights(chunk: torch.nn.Module) -> set:
    """ids of the fc1 weights stored as [gate; up]: those of MLPs whose config says
    gated_linear_unit (the Llama SwiGLU MLP is; a ViT's GELU MLP is not)."""
    ids = set()
    for module in unwrap(chunk).modules():
        fc1 = getattr(module, "linear_fc1", None)
        config = getattr(module, "config", None)
        if fc1 is not None and getattr(config, "gated_linear_unit", False) and getattr(fc1, "weight", None) is not None:
            ids.add(id(fc1.weight))
    return ids


def full_shape(param: torch.Tensor, tp: int) -> tuple:
    shape = list(param.shape)
    if is_tp_sharded(param):
        shape[param.partition_dim] *= tp
    return tuple(shape)


def shard(full: torch.Tensor, param: torch.Tensor, tp: int, rank: int, *, gated: bool = False) -> torch.Tensor:
    """This TP rank's piece of the full tensor, in the layout of `param` (`gated`: a [gate; up] fc1)."""
    if not is_tp_sharded(param) or tp == 1:
        return full
    dim = param.partition_dim
    if gated:
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp, dim=dim)[rank], up.chunk(tp, dim=dim)[rank]], dim=dim)
    return full.chunk(tp, dim=dim)[rank]


def gather(local: torch.Tensor, param: torch.Tensor, group, *, gated: bool = False) -> torch.Tensor:
    """Inverse of `shard`: all-gather `local` (a tensor shaped like `param`) over the TP group."""
    tp = dist.get_world_size(group)
    if not is_tp_sharded(param) or tp == 1:
        return local
    pieces = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(pieces, local.contiguous(), group=group)
    dim = param.partition_dim
    if gated:
        gates, ups = zip(*(p.chunk(2, dim=dim) for p in pieces))
        return torch.cat(list(gates) + list(ups), dim=dim)
    return torch.cat(pieces, dim=dim)


def gather_full_model(chunks: Iterable[torch.nn.Module], *, grads: bool = False) -> Optional[Dict[str, torch.Tensor]]:
    """The full single-rank state (weights, or megatron `main_grad`s) of a model spread over
    TP x PP, on global rank 0 (None elsewhere).  For checks and debugging of small models:
    it moves everything through rank 0 with object collectives.  With `grads`, parameters that
    do not train (frozen; no gradient buffer) are left out."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    mine: Dict[str, torch.Tensor] = {}
    for chunk in chunks:
        gated = gated_fc1_weights(chunk)
        for name, param in global_named_parameters(chunk):
            if grads and not param.requires_grad:
                continue
            local = param.main_grad if grads else param.data
            full = gather(local.detach().float(), param, tp_group, gated=id(param) in gated)
            # One copy of each: DP rank 0 for dense parameters, expert-DP rank 0 for experts.
            dp_rank = (parallel_state.get_expert_data_parallel_rank() if is_expert_parallel(param)
                       else parallel_state.get_data_parallel_rank(with_context_parallel=True))
            if parallel_state.get_tensor_model_parallel_rank() == 0 and dp_rank == 0:
                mine[name] = full.cpu().clone()
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, mine)
    if dist.get_rank() != 0:
        return None
    merged: Dict[str, torch.Tensor] = {}
    for part in everything:
        merged.update(part)
    return merged
