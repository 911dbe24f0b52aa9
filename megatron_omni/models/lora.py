"""Tensor-parallel LoRA for the LLM's linear layers (alignment tuning, M2-omni Sec. 2.2).

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021): y = W x + (alpha/r) B A x
with A [r, in], B [out, r], B = 0 at the start.  M2-omni trains LoRA on "5.0% of the LLM's
backbone weights" (`lora_rank_for_fraction`).

Sharding follows the base layer, so no layer sees a full-size tensor it would not see anyway:

* Column-parallel base (W [out/tp, in]; linear_qkv, linear_fc1): A [r, in] replicated,
  B [out/tp, r] sharded on dim 0 like W.  h = A x is computed redundantly on every TP rank
  and passes `copy_to_tensor_model_parallel_region` (identity forward, all-reduce backward)
  before B: every rank's B-slice contributes a partial dL/dh, the all-reduce makes dL/dh (and
  so A's gradient and the adapter's dL/dx) the full, identical value on every rank.  That is
  one all-reduce of an r-wide tensor instead of an in-wide one.
* Row-parallel base (W [out, in/tp]; linear_proj, linear_fc2): A [r, in/tp] sharded on dim 1
  like W, B [out, r] replicated.  The partial A_k x_k are summed over TP by
  `reduce_from_tensor_model_parallel_region` (all-reduce forward, identity backward); B then
  sees the same h on every rank, so its gradient is identical everywhere.
* Sequence parallel: the column input is sharded along the sequence, so h is computed on the
  local sequence chunk and all-gathered (`gather_from_sequence_parallel_region`, reduce-scatter
  backward); the row output is sequence-sharded, so the partial h is reduce-scattered
  (`reduce_scatter_to_sequence_parallel_region`).  The replicated factor then sees only this
  rank's tokens, its gradient is partial, and it is marked ``sequence_parallel = True`` so
  megatron's finalize_model_grads all-reduces it over TP (as it does for norm weights).

Sharded factors carry megatron's ``tensor_model_parallel`` / ``partition_dim`` attributes
(grad-norm counts replicated parameters once, sharded ones on every rank) and are saved as
TP-sharded tensors in distributed checkpoints; fc1's B, like fc1's weight, is stored
[gate_r; up_r] on rank r and checkpointed with megatron's SwiGLU factory, so checkpoints
reshard across TP.

The adapters hang off the base modules as a ``lora`` child (``...linear_qkv.lora.lora_A``) and
act through a forward hook: base parameter names are unchanged.  Apply LoRA before wrapping
the model in megatron's DDP (its gradient buffers cover the parameters that require grad).
"""

from __future__ import annotations

import contextlib
import logging
import math
import types
import zlib
from typing import Iterator, List, Sequence

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    get_cuda_rng_tracker,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)

from megatron_omni.config.schema import ModelConfig
from megatron_omni.parallel import layout

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_TARGETS", "LoRAAdapter", "adapters", "adapters_disabled", "apply_lora",
           "lora_rank_for_fraction", "merge_lora", "trainable_fraction"]

DEFAULT_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")

try:  # Transformer Engine layers (GPU builds); the local megatron layers cover CPU runs.
    # megatron leaves these names None when TE itself is missing.
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )
except Exception:  # ImportError, or TE present but unusable in this build
    TEColumnParallelLinear = TELayerNormColumnParallelLinear = TERowParallelLinear = None
_TE_COLUMN: tuple = tuple(c for c in (TEColumnParallelLinear, TELayerNormColumnParallelLinear) if isinstance(c, type))
_TE_ROW: tuple = tuple(c for c in (TERowParallelLinear,) if isinstance(c, type))


def _kind(module: torch.nn.Module) -> str:
    if isinstance(module, (ColumnParallelLinear,) + _TE_COLUMN):
        return "column"
    if isinstance(module, (RowParallelLinear,) + _TE_ROW):
        return "row"
    raise TypeError(f"LoRA supports megatron's (TE)ColumnParallelLinear / (TE)RowParallelLinear, "
                    f"got {type(module).__name__}")


def _te_layernorm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The normalised input a TELayerNormColumnParallelLinear feeds its GEMM (its norm is fused
    into the layer, so the adapter recomputes it with the layer's own norm weights)."""
    weight = module.layer_norm_weight
    if module.zero_centered_gamma:
        weight = weight + 1
    if module.normalization == "RMSNorm":
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + module.eps)
        return (y * weight.float()).to(x.dtype)
    if module.normalization == "LayerNorm":
        return F.layer_norm(x, (x.shape[-1],), weight, module.layer_norm_bias, module.eps)
    raise ValueError(f"LoRA: unsupported fused normalization {module.normalization!r}")


class LoRAAdapter(torch.nn.Module):
    """The low-rank path of one base layer: returns (alpha/r) B A x in the base output's layout."""

    def __init__(self, base: torch.nn.Module, kind: str, rank: int, alpha: float, dropout: float,
                 sequence_parallel: bool, gated: bool):
        super().__init__()
        out_local, in_local = base.weight.shape
        dev, dtype = base.weight.device, base.weight.dtype
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.kind = kind
        self.rank = rank
        self.scaling = alpha / rank
        self.dropout = dropout
        self.sequence_parallel = sequence_parallel
        self.gather_output = bool(getattr(base, "gather_output", False))
        self.layernorm = isinstance(TELayerNormColumnParallelLinear, type) and isinstance(
            base, TELayerNormColumnParallelLinear)
        self.gated = gated  # fc1 of a SwiGLU MLP: output rows are [gate_r; up_r] on rank r
        self.enabled = True
        if kind == "column":
            self.lora_A = torch.nn.Parameter(torch.empty(rank, in_local, device=dev, dtype=dtype))
            self.lora_B = torch.nn.Parameter(torch.zeros(out_local, rank, device=dev, dtype=dtype))
            set_tensor_model_parallel_attributes(self.lora_B, True, 0, 1)
            set_tensor_model_parallel_attributes(self.lora_A, False, -1, 1)
            replicated = self.lora_A
        else:
            self.lora_A = torch.nn.Parameter(torch.empty(rank, in_local, device=dev, dtype=dtype))
            self.lora_B = torch.nn.Parameter(torch.zeros(out_local, rank, device=dev, dtype=dtype))
            set_tensor_model_parallel_attributes(self.lora_A, True, 1, 1)
            set_tensor_model_parallel_attributes(self.lora_B, False, -1, 1)
            replicated = self.lora_B
        if sequence_parallel and tp > 1:
            replicated.sequence_parallel = True  # partial grads: megatron sums them over TP

    def full_in_features(self, tp: int) -> int:
        return self.lora_A.shape[1] * (tp if self.kind == "row" else 1)

    def _drop(self, x: torch.Tensor, sharded_input: bool) -> torch.Tensor:
        if not self.training or self.dropout == 0.0:
            return x
        if sharded_input:  # each TP rank holds different elements: its own dropout stream
            with get_cuda_rng_tracker().fork():
                return F.dropout(x, self.dropout, True)
        return F.dropout(x, self.dropout, True)  # same input on every rank, same default stream

    def forward(self, x: torch.Tensor, base: torch.nn.Module) -> torch.Tensor:
        a, b = self.lora_A, self.lora_B
        if self.kind == "column":
            if self.layernorm:
                x = _te_layernorm(base, x)
            h = F.linear(self._drop(x, self.sequence_parallel), a)
            if self.sequence_parallel:
                h = gather_from_sequence_parallel_region(h)
            else:
                h = copy_to_tensor_model_parallel_region(h)
            y = F.linear(h, b)
            if self.gather_output:
                y = gather_from_tensor_model_parallel_region(y)
        else:
            h = F.linear(self._drop(x, True), a)
            if self.sequence_parallel:
                h = reduce_scatter_to_sequence_parallel_region(h)
            else:
                h = reduce_from_tensor_model_parallel_region(h)
            y = F.linear(h, b)
        return y * self.scaling

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """(alpha/r) B A in the base weight's local layout ([out/tp, in] or [out, in/tp])."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling


def _lora_hook(module: torch.nn.Module, args, kwargs, output):
    adapter: LoRAAdapter = module.lora
    if not adapter.enabled:
        return output
    # megatron layers take the input as `input_`, TE's as `x`; callers pass it positionally.
    x = args[0] if args else kwargs.get("input_", kwargs.get("x"))
    out, bias = output
    return out + adapter(x, module).to(out.dtype), bias


def _with_lora_sharding(base: torch.nn.Module, adapter: LoRAAdapter) -> None:
    """Make the base layer's distributed-checkpoint entries for the adapter TP-aware."""
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    original = base.sharded_state_dict

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sd = original(prefix, sharded_offsets, metadata)
        params = {"lora_A": adapter.lora_A, "lora_B": adapter.lora_B}
        axis = {"lora_B": 0} if adapter.kind == "column" else {"lora_A": 1}
        lora_sd = make_sharded_tensors_for_checkpoint(params, f"{prefix}lora.", axis, sharded_offsets)
        if adapter.gated:
            key = f"{prefix}lora.lora_B"
            singleton = (metadata or {}).get("singleton_local_shards", False)
            lora_sd[key] = apply_swiglu_sharded_factory(lora_sd[key], sharded_offsets, singleton)
        sd.update(lora_sd)
        return sd

    base.sharded_state_dict = types.MethodType(sharded_state_dict, base)


def _chunks(model) -> List[torch.nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def adapters(model) -> Iterator[LoRAAdapter]:
    for chunk in _chunks(model):
        for module in chunk.modules():
            if isinstance(module, LoRAAdapter):
                yield module


@torch.no_grad()
def apply_lora(model, targets: Sequence[str] = DEFAULT_TARGETS, *, rank: int, alpha: float,
               dropout: float = 0.0, seed: int = 1234, within: str = "") -> List[LoRAAdapter]:
    """Freeze every parameter of `model` (a GPTModel chunk or a list of them) and add LoRA
    adapters to the linear layers named in `targets`.

    A is drawn layout-invariantly, like the base weights (models/init.py): the full [r, in]
    tensor from a generator seeded by (seed, global base-weight name), Kaiming-uniform
    (bound 1/sqrt(in), Hu et al.'s default), then this rank keeps its shard; B starts at 0.
    The same seed therefore gives the same adapters at every TP/PP layout.  `within` limits the
    adapters to modules whose name starts with it (e.g. "decoder." = the LLM's layers of an
    OmniModel, not its encoders); the parameters outside are frozen all the same.
    """
    if isinstance(rank, bool) or int(rank) != rank or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must lie in [0, 1), got {dropout!r}")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    added: List[LoRAAdapter] = []
    for chunk in _chunks(model):
        inner = layout.unwrap(chunk)
        names = {id(p): n for n, p in layout.global_named_parameters(inner)}
        gated_ids = layout.gated_fc1_weights(inner)
        for p in inner.parameters():
            p.requires_grad_(False)
        targets_found = [(n, m) for n, m in inner.named_modules()
                         if n.rsplit(".", 1)[-1] in targets and n.startswith(within)]
        if not targets_found:
            raise ValueError(f"LoRA: no module named one of {list(targets)} in {type(inner).__name__}")
        for mod_name, module in targets_found:
            if hasattr(module, "lora"):
                raise ValueError(f"LoRA already applied to {mod_name}")
            if getattr(module, "is_expert", False):
                raise ValueError(f"LoRA on expert layers is not supported ({mod_name})")
            kind = _kind(module)
            sp = bool(getattr(module, "sequence_parallel", False)) and tp > 1
            gated = id(module.weight) in gated_ids
            adapter = LoRAAdapter(module, kind, int(rank), float(alpha), float(dropout), sp, gated)
            in_full = adapter.full_in_features(tp)
            gen = torch.Generator(device="cpu")
            gen.manual_seed(zlib.crc32(f"{seed}:lora_A:{names[id(module.weight)]}".encode()))
            bound = 1.0 / math.sqrt(in_full)
            full_a = torch.empty(int(rank), in_full).uniform_(-bound, bound, generator=gen)
            adapter.lora_A.copy_(layout.shard(full_a, adapter.lora_A, tp, tp_rank))
            module.lora = adapter  # registers the child: ...<mod_name>.lora.lora_A
            module._lora_hook = module.register_forward_hook(_lora_hook, with_kwargs=True)
            _with_lora_sharding(module, adapter)
            added.append(adapter)
    log.info("LoRA: rank %d, alpha %g on %d layers (%s); %d trainable parameters on this rank",
             rank, alpha, len(added), ", ".join(targets),
             sum(a.lora_A.numel() + a.lora_B.numel() for a in added))
    return added


@contextlib.contextmanager
def adapters_disabled(model):
    """The base model: adapters off inside the block (the DPO reference policy, no second copy)."""
    found = list(adapters(model))
    previous = [a.enabled for a in found]
    for a in found:
        a.enabled = False
    try:
        yield model
    finally:
        for a, was in zip(found, previous):
            a.enabled = was


@torch.no_grad()
def merge_lora(model) -> int:
    """Fold (alpha/r) B A into every adapted base weight and remove the adapters (for export).

    Each rank merges its own shard: B_local A (column) or B A_local (row) is exactly the local
    block of the full B A.  Returns the number of merged layers.
    """
    merged = 0
    for chunk in _chunks(model):
        for module in list(layout.unwrap(chunk).modules()):
            adapter = getattr(module, "lora", None)
            if not isinstance(adapter, LoRAAdapter):
                continue
            w = module.weight
            w.copy_((w.float() + adapter.delta_weight()).to(w.dtype))
            module._lora_hook.remove()
            del module._lora_hook
            del module.lora
            del module.sharded_state_dict  # back to the class method
            merged += 1
    return merged


def lora_rank_for_fraction(model: ModelConfig, fraction: float = 0.05,
                           targets: Sequence[str] = DEFAULT_TARGETS) -> int:
    """The LoRA rank whose adapters hold ~`fraction` of the LLM's parameters (Sec. 2.2: 5.0%).

    Backbone = every LLM parameter (embedding, layers, final norm, output layer; vocabulary
    unpadded).  Adapter parameters per layer = r * sum over targets of (in + out).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction!r}")
    per_rank = lora_params_per_rank(model, targets)
    return max(1, round(fraction * backbone_params(model) / per_rank))


def backbone_params(model: ModelConfig) -> int:
    h, f = model.hidden_size, model.ffn_hidden_size
    q, kv = model.num_attention_heads * model.head_dim, model.num_query_groups * model.head_dim
    layer = h * (q + 2 * kv) + q * h + h * 2 * f + f * h + 2 * h
    vocab = model.vocab_size * h * (1 if model.tie_word_embeddings else 2)
    return model.num_layers * layer + vocab + h


def lora_params_per_rank(model: ModelConfig, targets: Sequence[str] = DEFAULT_TARGETS) -> int:
    """Adapter parameters of the whole model per unit of LoRA rank."""
    h, f = model.hidden_size, model.ffn_hidden_size
    q, kv = model.num_attention_heads * model.head_dim, model.num_query_groups * model.head_dim
    in_out = {"linear_qkv": (h, q + 2 * kv), "linear_proj": (q, h), "linear_fc1": (h, 2 * f), "linear_fc2": (f, h)}
    unknown = set(targets) - set(in_out)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; known: {sorted(in_out)}")
    return model.num_layers * sum(sum(in_out[t]) for t in targets)


def trainable_fraction(model, model_cfg: ModelConfig) -> float:
    """Trainable parameters of this rank's model over the full backbone (TP=PP=1 reading)."""
    trainable = sum(p.numel() for chunk in _chunks(model) for p in chunk.parameters() if p.requires_grad)
    return trainable / backbone_params(model_cfg)
