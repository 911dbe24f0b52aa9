"""Declarative HF <-> megatron parameter mapping.

A model family is one `ModelTable`: a list of `Rule`s, each naming HF tensor(s) and the
megatron *checkpoint* tensor they become, with the transform between them, the HF
shapes in terms of the model's dimensions, and the megatron TP split axis.  Everything
else -- expansion over layers, coverage and shape checks, streaming in both directions,
resharding -- is generic code in `convert.py` that only reads tables.

Name conventions:
  * HF patterns and megatron patterns may contain `{layer}` (global decoder layer index).
  * The megatron pattern is the dist-checkpoint key *with* the layer index: the stored
    key drops `{layer}.` and stacks the layers on a prepended axis, as megatron's
    TransformerBlock.sharded_state_dict does (`decoder.layers.{layer}.mlp.linear_fc2.weight`
    is stored as `decoder.layers.mlp.linear_fc2.weight` of shape [num_layers, ...]).
  * Checkpoint keys are Transformer-Engine names (norms fused into the next linear:
    `self_attention.linear_qkv.layer_norm_weight`); `local=` gives the local-spec
    parameter name where it differs (`input_layernorm.weight`).  megatron's sharded
    state dict maps local names onto TE keys, so a checkpoint is the same either way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_omni.config.schema import ModelConfig

Shape = Tuple[int, ...]


# --------------------------------------------------------------------------------------
# Dimensions a table's shapes are written in


@dataclass(frozen=True)
class Dims:
    """Named sizes of one model; `padded_vocab` is the row count of the megatron vocab tensors."""

    hidden: int
    ffn: int
    vocab: int
    padded_vocab: int
    heads: int
    groups: int
    head_dim: int
    layers: int

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.groups * self.head_dim

    def size(self, name: str) -> int:
        return getattr(self, name)

    @classmethod
    def of(cls, model: ModelConfig, padded_vocab: Optional[int] = None) -> "Dims":
        return cls(
            hidden=model.hidden_size, ffn=model.ffn_hidden_size, vocab=model.vocab_size,
            padded_vocab=padded_vocab if padded_vocab is not None else model.padded_vocab_size(1),
            heads=model.num_attention_heads, groups=model.num_query_groups, head_dim=model.head_dim,
            layers=model.num_layers,
        )


# --------------------------------------------------------------------------------------
# Transforms: exact (bit-preserving) rearrangements between HF tensors and one megatron tensor


class Transform:
    """HF tensors (in the order the rule lists them) <-> one megatron tensor (one layer's slice)."""

    name = "identity"
    arity = 1

    def mcore_shape(self, hf_shapes: Sequence[Shape], dims: Dims) -> Shape:
        return tuple(hf_shapes[0])

    def to_mcore(self, hf: Sequence[torch.Tensor], dims: Dims) -> torch.Tensor:
        return hf[0]

    def to_mcore_lazy(self, hf: Sequence["LazyTensor"], dims: Dims, dtype: torch.dtype) -> torch.Tensor:
        """Like to_mcore, reading the inputs on demand (a transform may read straight into its output)."""
        return self.to_mcore([x.load(dtype) for x in hf], dims)

    def to_hf(self, mc: torch.Tensor, dims: Dims) -> List[torch.Tensor]:
        return [mc]


class QKVInterleave(Transform):
    """q [heads*d, H], k [groups*d, H], v [groups*d, H] -> megatron's fused linear_qkv.

    megatron orders the fused rows by GQA group: for group g, the (heads/groups) query
    heads of the group, then its key head, then its value head.  HF's grouped-query
    attention gives query head h the key/value head h // (heads/groups), so the query
    heads of group g are HF heads g*(heads/groups) ... in order: a reshape, no permutation.
    Both use rotate-half RoPE on the same head_dim layout (verified numerically by the tests).
    """

    name = "qkv_interleave"
    arity = 3

    def mcore_shape(self, hf_shapes, dims):
        (q, h), (k, _), (v, _) = hf_shapes
        return (q + k + v, h)

    def to_mcore(self, hf, dims):
        q, k, v = hf
        g, d, per = dims.groups, dims.head_dim, dims.heads // dims.groups
        hidden = q.shape[-1]
        fused = torch.cat([q.reshape(g, per * d, hidden), k.reshape(g, d, hidden), v.reshape(g, d, hidden)], dim=1)
        return fused.reshape(g * (per + 2) * d, hidden)

    def to_hf(self, mc, dims):
        g, d, per = dims.groups, dims.head_dim, dims.heads // dims.groups
        hidden = mc.shape[-1]
        grouped = mc.reshape(g, (per + 2) * d, hidden)
        q, k, v = torch.split(grouped, [per * d, d, d], dim=1)
        return [q.reshape(g * per * d, hidden), k.reshape(g * d, hidden), v.reshape(g * d, hidden)]


class GateUpFuse(Transform):
    """SwiGLU: gate [F, H] and up [F, H] -> linear_fc1 [gate; up] (megatron splits each half over TP)."""

    name = "gate_up_fuse"
    arity = 2

    def mcore_shape(self, hf_shapes, dims):
        (f, h), (f2, _) = hf_shapes
        return (f + f2, h)

    def to_mcore(self, hf, dims):
        return torch.cat([hf[0], hf[1]], dim=0)

    def to_hf(self, mc, dims):
        gate, up = torch.chunk(mc, 2, dim=0)
        return [gate, up]


class VocabPad(Transform):
    """[vocab, H] <-> [padded_vocab, H]: megatron pads the vocabulary to a multiple of
    make_vocab_size_divisible_by x TP with zero rows at the end; HF has no padding."""

    name = "vocab_pad"
    arity = 1

    def mcore_shape(self, hf_shapes, dims):
        (_, h), = hf_shapes
        return (dims.padded_vocab, h)

    def to_mcore(self, hf, dims):
        (t,) = hf
        if dims.padded_vocab < t.shape[0]:
            raise ValueError(f"padded vocab {dims.padded_vocab} < vocab {t.shape[0]}")
        out = torch.zeros((dims.padded_vocab,) + tuple(t.shape[1:]), dtype=t.dtype)
        out[: t.shape[0]].copy_(t)
        return out

    def to_mcore_lazy(self, hf, dims, dtype):
        (x,) = hf
        out = torch.zeros((dims.padded_vocab,) + tuple(x.shape[1:]), dtype=dtype)
        x.load_into(out[: x.shape[0]])  # no second copy of a (possibly 2 GB) embedding
        return out

    def to_hf(self, mc, dims):
        return [mc[: dims.vocab]]


class LazyTensor:
    """An input tensor not read yet: its shape, and how to read it."""

    def __init__(self, shape: Shape, load: Callable[[torch.dtype], torch.Tensor],
                 load_into: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self.shape = tuple(shape)
        self._load = load
        self._load_into = load_into

    def load(self, dtype: torch.dtype) -> torch.Tensor:
        return self._load(dtype)

    def load_into(self, out: torch.Tensor) -> torch.Tensor:
        if self._load_into is not None:
            return self._load_into(out)
        return out.copy_(self._load(out.dtype))


IDENTITY = Transform()
QKV = QKVInterleave()
GATE_UP = GateUpFuse()
VOCAB_PAD = VocabPad()

Condition = Callable[[ModelConfig], bool]


def always(model: ModelConfig) -> bool:
    return True


def tied(model: ModelConfig) -> bool:
    return model.tie_word_embeddings


def untied(model: ModelConfig) -> bool:
    return not model.tie_word_embeddings


# --------------------------------------------------------------------------------------
# Table entries


@dataclass(frozen=True)
class Rule:
    """HF tensor(s) <-> one megatron checkpoint tensor.

    hf_shapes: per HF tensor, its shape as names of `Dims` fields ("vocab", "hidden", "q", "kv", "ffn").
    tp_axis: the dim megatron splits over tensor parallelism (None: replicated); checked
      against the model megatron actually builds.
    """

    hf: Tuple[str, ...]
    hf_shapes: Tuple[Tuple[str, ...], ...]
    mcore: str
    transform: Transform = IDENTITY
    tp_axis: Optional[int] = None
    local: Optional[str] = None
    when: Condition = always

    def __post_init__(self):
        if len(self.hf) != self.transform.arity or len(self.hf_shapes) != len(self.hf):
            raise ValueError(f"rule {self.mcore}: {len(self.hf)} HF tensors / {len(self.hf_shapes)} shapes "
                             f"for transform {self.transform.name} of arity {self.transform.arity}")
        layered = ["{layer}" in p for p in self.hf + (self.mcore,)]
        if len(set(layered)) != 1:
            raise ValueError(f"rule {self.mcore}: either every pattern has {{layer}} or none does")

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.mcore

    @property
    def key(self) -> str:
        """The dist-checkpoint key (layers stacked on a prepended axis)."""
        return self.mcore.replace("{layer}.", "")


@dataclass(frozen=True)
class TiedCopy:
    """An HF tensor that, when present, must equal another one (e.g. `lm_head.weight` saved next to
    tied input embeddings); it is checked, not converted, and not written on export."""

    hf: str
    same_as: str
    when: Condition = always


@dataclass(frozen=True)
class Drop:
    """An HF tensor that is accepted and deliberately not converted (e.g. a RoPE buffer that megatron
    recomputes from the config); it is not written on export."""

    hf: str
    reason: str
    when: Condition = always


@dataclass(frozen=True)
class Binding:
    """One rule applied to one layer: concrete names, shapes and the megatron (key, layer) slot."""

    rule: Rule
    layer: Optional[int]
    hf_names: Tuple[str, ...]
    hf_shapes: Tuple[Shape, ...]
    key: str
    mcore_shape: Shape  # one layer's slice

    @property
    def param_names(self) -> Tuple[str, ...]:
        """Single-rank megatron parameter names this binding fills (TE name, and local name if different)."""
        fmt = {"layer": self.layer}
        names = [self.rule.mcore.format(**fmt)]
        if self.rule.local:
            names.append(self.rule.local.format(**fmt))
        return tuple(names)


@dataclass
class ModelTable:
    """A model family: which HF architectures it reads, its config adapter and its rules."""

    name: str
    hf_architectures: Tuple[str, ...]
    hf_model_types: Tuple[str, ...]
    rules: Tuple[Rule, ...]
    tied_copies: Tuple[TiedCopy, ...] = ()
    drops: Tuple[Drop, ...] = ()
    # HF config.json (dict) -> ModelConfig; raises ConversionError on anything unsupported.
    config_from_hf: Callable[..., ModelConfig] = None
    # ModelConfig (+ template config.json dict, dtype) -> config.json dict
    config_to_hf: Callable[..., dict] = None
    _key_index: Dict[str, Rule] = field(default_factory=dict, repr=False)

    def bindings(self, model: ModelConfig, dims: Dims) -> List[Binding]:
        """Every rule that applies to this config, once per layer, in table order: the rules listed
        before the first per-layer rule, then each layer's rules for layer 0 ... L-1, then the rest."""
        out: List[Binding] = []
        rules = [r for r in self.rules if r.when(model)]
        first = next((i for i, r in enumerate(rules) if r.per_layer), len(rules))
        head = [r for r in rules[:first] if not r.per_layer]  # table order: rules above the layers ...
        layered = [r for r in rules if r.per_layer]
        tail = [r for r in rules[first:] if not r.per_layer]  # ... and below them
        for rule in head:
            out.append(self._bind(rule, None, dims))
        for layer in range(model.num_layers):
            for rule in layered:
                out.append(self._bind(rule, layer, dims))
        for rule in tail:
            out.append(self._bind(rule, None, dims))
        return out

    @staticmethod
    def _bind(rule: Rule, layer: Optional[int], dims: Dims) -> Binding:
        fmt = {"layer": layer}
        hf_shapes = tuple(tuple(dims.size(n) for n in shape) for shape in rule.hf_shapes)
        return Binding(
            rule=rule, layer=layer, hf_names=tuple(p.format(**fmt) for p in rule.hf), hf_shapes=hf_shapes,
            key=rule.key, mcore_shape=rule.transform.mcore_shape(hf_shapes, dims),
        )

    def checkpoint_shapes(self, model: ModelConfig, dims: Dims) -> Dict[str, Shape]:
        """Global shape of every megatron checkpoint tensor this config has (layers stacked)."""
        shapes: Dict[str, Shape] = {}
        for b in self.bindings(model, dims):
            shapes[b.key] = ((model.num_layers,) + b.mcore_shape) if b.layer is not None else b.mcore_shape
        return shapes

    def tied_copies_for(self, model: ModelConfig) -> List[Tuple[TiedCopy, List[str]]]:
        return [(t, _expand(t.hf, model.num_layers)) for t in self.tied_copies if t.when(model)]

    def drops_for(self, model: ModelConfig) -> List[Tuple[Drop, List[str]]]:
        return [(d, _expand(d.hf, model.num_layers)) for d in self.drops if d.when(model)]

    def rule_for_param(self, name: str) -> Optional[Tuple[Rule, Optional[int]]]:
        """The rule (and layer) that fills a single-rank megatron parameter name, TE or local spelling."""
        m = re.match(r"^(.*?)\.(\d+)\.(.*)$", name)
        layer = int(m.group(2)) if m and m.group(1) == "decoder.layers" else None
        generic = f"decoder.layers.{{layer}}.{m.group(3)}" if layer is not None else name
        for rule in self.rules:
            if generic in (rule.mcore, rule.local):
                return rule, layer
        return None


def _expand(pattern: str, num_layers: int) -> List[str]:
    if "{layer}" in pattern:
        return [pattern.format(layer=i) for i in range(num_layers)]
    return [pattern]
