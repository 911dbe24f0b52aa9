"""MoE backbone (models/moe) <-> HF Qwen2-MoE layout: the mapping table and config adapter.

HF layout (transformers `Qwen2MoeForCausalLM`, experts stored one by one):

    model.layers.{i}.mlp.gate.weight                         router [E (+ N), hidden]
    model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight
    model.layers.{i}.mlp.shared_expert.{gate,up,down}_proj.weight
    model.layers.{i}.mlp.shared_expert_gate.weight           [1, hidden]

megatron stacks the experts of a layer on one checkpoint tensor
(`decoder.layers.mlp.experts.experts.linear_fc1.weight` is [layers, E, 2 * ffn, hidden]); the
`StackedExperts` transform maps E experts' HF tensors onto it, reusing the dense SwiGLU transform
per expert.  The rest of the table is the Llama one.

When the model *is* Qwen2-MoE -- no null experts, top-k on softmax over all experts (megatron
pre-softmax; `norm_topk_prob=true` is megatron's top-k-then-softmax), a gated shared expert,
default RoPE, no q/k/v biases (`qkv_bias=false`) -- the HF folder is a `Qwen2MoeForCausalLM` that
transformers loads and runs with the same logits (tests/moe/test_moe_convert.py).  Otherwise
(null experts, top-p routing, no shared-expert gate, Llama-3 RoPE scaling) it is written as
`MegatronOmniMoEForCausalLM`: the same tensor names, the router with E + N rows, and the routing
options under `megatron_omni_moe` in config.json -- a lossless round-trip layout that transformers
has no model class for.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from megatron_omni.config.schema import ModelConfig
from megatron_omni.convert.errors import ConversionError
from megatron_omni.convert.llama import RULES as LLAMA_RULES
from megatron_omni.convert.llama import DROPS, TIED_COPIES, _rope
from megatron_omni.convert.mapping import GATE_UP, Binding, Dims, ModelTable, Rule, Transform
from megatron_omni.config.moe import MoEConfig

QWEN2_MOE = "Qwen2MoeForCausalLM"
NULL_MOE = "MegatronOmniMoEForCausalLM"
L = "model.layers.{layer}."
D = "decoder.layers.{layer}."
_DENSE_MLP_KEYS = (D + "mlp.linear_fc1.weight", D + "mlp.linear_fc2.weight")


@dataclasses.dataclass(frozen=True)
class MoEDims(Dims):
    """Dims plus the MoE widths the expert rules' shapes are written in."""

    router: int = 0  # E + N router outputs
    moe_ffn: int = 0
    shared_ffn: int = 0
    one: int = 1  # the shared-expert gate's single output row

    @classmethod
    def extend(cls, dims: Dims, moe: MoEConfig) -> "MoEDims":
        return cls(**dataclasses.asdict(dims), router=moe.num_router_outputs, moe_ffn=moe.ffn_hidden_size,
                   shared_ffn=moe.shared_expert_ffn_hidden_size or 0)


class StackedExperts(Transform):
    """E experts' HF tensors (each group in `inner`'s order) <-> megatron's [E, ...] stacked tensor."""

    def __init__(self, inner: Transform, num_experts: int):
        self.inner, self.num_experts = inner, num_experts
        self.name = f"experts[{num_experts}]({inner.name})"
        self.arity = inner.arity * num_experts

    def _groups(self, items: Sequence) -> List[Sequence]:
        a = self.inner.arity
        return [items[e * a:(e + 1) * a] for e in range(self.num_experts)]

    def mcore_shape(self, hf_shapes, dims):
        return (self.num_experts,) + tuple(self.inner.mcore_shape(self._groups(hf_shapes)[0], dims))

    def to_mcore(self, hf, dims):
        import torch

        return torch.stack([self.inner.to_mcore(group, dims) for group in self._groups(hf)])

    def to_hf(self, mc, dims):
        return [t for e in range(self.num_experts) for t in self.inner.to_hf(mc[e], dims)]


def moe_rules(model: ModelConfig) -> Tuple[Rule, ...]:
    """The Llama rules minus the dense MLP, plus router, stacked experts and shared expert."""
    moe = model.moe
    E = moe.num_experts
    experts = [f"{L}mlp.experts.{e}." for e in range(E)]
    rules = [r for r in LLAMA_RULES if r.mcore not in _DENSE_MLP_KEYS]
    # Routed experts: `tp_axis` is the split axis of each expert's own parameter (what
    # megatron's per-expert modules carry), not of the stacked checkpoint tensor.
    rules += [
        Rule(hf=(L + "mlp.gate.weight",), hf_shapes=(("router", "hidden"),), mcore=D + "mlp.router.weight"),
        Rule(hf=tuple(p + s for p in experts for s in ("gate_proj.weight", "up_proj.weight")),
             hf_shapes=(("moe_ffn", "hidden"),) * (2 * E), mcore=D + "mlp.experts.experts.linear_fc1.weight",
             transform=StackedExperts(GATE_UP, E), tp_axis=0),
        Rule(hf=tuple(p + "down_proj.weight" for p in experts), hf_shapes=(("hidden", "moe_ffn"),) * E,
             mcore=D + "mlp.experts.experts.linear_fc2.weight", transform=StackedExperts(Transform(), E), tp_axis=1),
    ]
    if moe.shared_expert_ffn_hidden_size:
        s = L + "mlp.shared_expert."
        rules += [
            Rule(hf=(s + "gate_proj.weight", s + "up_proj.weight"), hf_shapes=(("shared_ffn", "hidden"),) * 2,
                 mcore=D + "mlp.shared_experts.linear_fc1.weight", transform=GATE_UP, tp_axis=0),
            Rule(hf=(s + "down_proj.weight",), hf_shapes=(("hidden", "shared_ffn"),),
                 mcore=D + "mlp.shared_experts.linear_fc2.weight", tp_axis=1),
        ]
        if moe.shared_expert_gate:
            rules.append(Rule(hf=(L + "mlp.shared_expert_gate.weight",), hf_shapes=(("one", "hidden"),),
                              mcore=D + "mlp.shared_experts.gate_weight"))
    return tuple(rules)


@dataclasses.dataclass
class MoETable(ModelTable):
    """A table whose rules depend on the config (number of experts, shared expert present): they are
    built by `bindings(model, ...)`, which every conversion calls first, and kept for `rule_for_param`."""

    model_rules: Tuple[Rule, ...] = ()

    def bindings(self, model: ModelConfig, dims: Dims) -> List[Binding]:
        if model.moe is None:
            raise ConversionError("model config", {"unsupported config": [
                f"table {self.name!r} converts MoE models: the model config has no moe section"]})
        self.model_rules = moe_rules(model)
        return ModelTable.bindings(dataclasses.replace(self, rules=self.model_rules), model,
                                   MoEDims.extend(dims, model.moe))

    def rule_for_param(self, name: str):
        """Expert parameters are per expert (`...experts.local_experts.{e}.linear_fc1.weight`, global e):
        the rule of their stacked tensor."""
        m = re.match(r"^decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.\d+\.(linear_fc[12]\.weight)$", name)
        if m:
            key = f"decoder.layers.{{layer}}.mlp.experts.experts.{m.group(2)}"
            return next(((r, int(m.group(1))) for r in self.model_rules if r.mcore == key), None)
        return ModelTable.rule_for_param(dataclasses.replace(self, rules=self.model_rules), name)


# --------------------------------------------------------------------------------------
# config.json <-> ModelConfig

_DEFAULTS = {"rms_norm_eps": 1e-6, "initializer_range": 0.02, "attention_dropout": 0.0, "tie_word_embeddings": False,
             "hidden_act": "silu", "max_position_embeddings": 32768, "norm_topk_prob": False, "qkv_bias": True,
             "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False,
             "router_aux_loss_coef": 0.001, "rope_theta": 10000.0}


def is_qwen2_moe(model: ModelConfig) -> bool:
    """Whether transformers' Qwen2MoeForCausalLM computes exactly this model."""
    moe = model.moe
    return (moe.num_null_experts == 0 and moe.router_type == "topk" and moe.router_topk_scaling_factor is None
            and bool(moe.shared_expert_ffn_hidden_size) and moe.shared_expert_gate and not model.rope_scaling)


def config_from_hf(cfg: Dict[str, Any], *, make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    problems: List[str] = []
    get = lambda k: cfg.get(k, _DEFAULTS.get(k))  # noqa: E731
    archs = cfg.get("architectures") or []
    if not set(archs) & {QWEN2_MOE, NULL_MOE}:
        problems.append(f"architectures={archs}: this table converts {QWEN2_MOE} and {NULL_MOE}")
    required = ["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "num_experts",
                "num_experts_per_tok", "moe_intermediate_size"]
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ConversionError("HF config.json", {"unsupported config": [f"missing required keys {missing}"]})
    if get("hidden_act") != "silu":
        problems.append(f"hidden_act={get('hidden_act')!r}: experts are SwiGLU (silu)")
    if get("qkv_bias"):
        problems.append("qkv_bias=true: the megatron-omni backbone has no q/k/v biases")
    if get("decoder_sparse_step") != 1 or get("mlp_only_layers"):
        problems.append("decoder_sparse_step / mlp_only_layers: every layer must be an MoE layer")
    if get("use_sliding_window"):
        problems.append("use_sliding_window=true: sliding-window attention is not supported")
    rope = _rope(cfg, problems)
    extra = cfg.get("megatron_omni_moe") or {}
    shared = cfg.get("shared_expert_intermediate_size") or None
    moe = MoEConfig(
        num_experts=int(cfg["num_experts"]),
        router_topk=int(cfg["num_experts_per_tok"]),
        ffn_hidden_size=int(cfg["moe_intermediate_size"]),
        shared_expert_ffn_hidden_size=int(shared) if shared else None,
        shared_expert_gate=bool(extra.get("shared_expert_gate", True)) and bool(shared),
        # Qwen2-MoE: softmax over all experts, top-k, renormalised iff norm_topk_prob -- which is
        # megatron's top-k on logits followed by a softmax over the k (router_pre_softmax=false).
        router_pre_softmax=not bool(get("norm_topk_prob")),
        aux_loss_coeff=float(get("router_aux_loss_coef")),
        num_null_experts=int(extra.get("num_null_experts", 0)),
        router_type=str(extra.get("router_type", "topk")),
        router_topp=float(extra.get("router_topp", 0.7)),
    )
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if problems:
        raise ConversionError("HF config.json", {"unsupported config": problems})
    return ModelConfig(
        num_layers=int(cfg["num_hidden_layers"]), hidden_size=hidden,
        ffn_hidden_size=int(cfg.get("intermediate_size") or moe.ffn_hidden_size),
        num_attention_heads=heads, num_query_groups=int(cfg.get("num_key_value_heads") or heads),
        kv_channels=head_dim if head_dim != hidden // heads else None, vocab_size=int(cfg["vocab_size"]),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        max_position_embeddings=int(get("max_position_embeddings")), rotary_base=rope["theta"],
        rope_scaling=rope["type"] == "llama3", rope_scaling_factor=rope.get("factor", 8.0),
        norm_epsilon=float(get("rms_norm_eps")), tie_word_embeddings=bool(get("tie_word_embeddings")),
        init_method_std=float(get("initializer_range")), attention_dropout=float(get("attention_dropout") or 0.0),
        moe=moe,
    )


def config_to_hf(model: ModelConfig, *, dtype: str, template: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    from megatron_omni.convert.llama import config_to_hf as llama_config_to_hf

    moe = model.moe
    out = llama_config_to_hf(dataclasses.replace(model, moe=None), dtype=dtype, template=template)
    for key in ("mlp_bias", "attention_bias", "pretraining_tp", "megatron_omni_moe"):
        out.pop(key, None)
    qwen = is_qwen2_moe(model)
    out.update({
        "architectures": [QWEN2_MOE if qwen else NULL_MOE],
        "model_type": "qwen2_moe" if qwen else "megatron_omni_moe",
        "qkv_bias": False,
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.router_topk,
        "moe_intermediate_size": moe.ffn_hidden_size,
        "shared_expert_intermediate_size": moe.shared_expert_ffn_hidden_size or 0,
        "norm_topk_prob": not moe.router_pre_softmax,
        "router_aux_loss_coef": moe.aux_loss_coeff,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "use_sliding_window": False,
        "sliding_window": None,
        "output_router_logits": False,
    })
    if not qwen:
        out["megatron_omni_moe"] = {
            "num_null_experts": moe.num_null_experts, "router_type": moe.router_type,
            "router_topp": moe.router_topp, "shared_expert_gate": moe.shared_expert_gate,
        }
    return out


QWEN2_MOE_TABLE = MoETable(
    name="qwen2_moe",
    hf_architectures=(QWEN2_MOE, NULL_MOE),
    hf_model_types=("qwen2_moe", "megatron_omni_moe"),
    rules=(),
    tied_copies=TIED_COPIES,
    drops=DROPS,
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
)
