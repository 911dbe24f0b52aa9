"""Llama family (Llama-2/3/3.1/3.2/3.3, HF `LlamaForCausalLM`): the mapping table and the config adapter."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from megatron_omni.config.schema import ModelConfig
from megatron_omni.convert.errors import ConversionError
from megatron_omni.convert.mapping import GATE_UP, QKV, VOCAB_PAD, Drop, ModelTable, Rule, TiedCopy, tied, untied

L = "model.layers.{layer}."
D = "decoder.layers.{layer}."

RULES = (
    Rule(hf=("model.embed_tokens.weight",), hf_shapes=(("vocab", "hidden"),),
         mcore="embedding.word_embeddings.weight", transform=VOCAB_PAD, tp_axis=0),
    Rule(hf=(L + "input_layernorm.weight",), hf_shapes=(("hidden",),),
         mcore=D + "self_attention.linear_qkv.layer_norm_weight", local=D + "input_layernorm.weight"),
    Rule(hf=(L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight", L + "self_attn.v_proj.weight"),
         hf_shapes=(("q", "hidden"), ("kv", "hidden"), ("kv", "hidden")),
         mcore=D + "self_attention.linear_qkv.weight", transform=QKV, tp_axis=0),
    Rule(hf=(L + "self_attn.o_proj.weight",), hf_shapes=(("hidden", "q"),),
         mcore=D + "self_attention.linear_proj.weight", tp_axis=1),
    Rule(hf=(L + "post_attention_layernorm.weight",), hf_shapes=(("hidden",),),
         mcore=D + "mlp.linear_fc1.layer_norm_weight", local=D + "pre_mlp_layernorm.weight"),
    Rule(hf=(L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"), hf_shapes=(("ffn", "hidden"), ("ffn", "hidden")),
         mcore=D + "mlp.linear_fc1.weight", transform=GATE_UP, tp_axis=0),
    Rule(hf=(L + "mlp.down_proj.weight",), hf_shapes=(("hidden", "ffn"),),
         mcore=D + "mlp.linear_fc2.weight", tp_axis=1),
    Rule(hf=("model.norm.weight",), hf_shapes=(("hidden",),), mcore="decoder.final_layernorm.weight"),
    # Untied: a separate output layer.  Tied (Llama-3.2 1B/3B): megatron stores only the embedding
    # (the last pipeline stage's output_layer is a replica of it), HF usually has no lm_head.weight.
    Rule(hf=("lm_head.weight",), hf_shapes=(("vocab", "hidden"),),
         mcore="output_layer.weight", transform=VOCAB_PAD, tp_axis=0, when=untied),
)

TIED_COPIES = (TiedCopy(hf="lm_head.weight", same_as="model.embed_tokens.weight", when=tied),)

DROPS = (Drop(hf=L + "self_attn.rotary_emb.inv_freq", reason="RoPE buffer (old checkpoints); megatron recomputes it"),)

# megatron-core's Llama-3 RoPE scaling (RotaryEmbedding._apply_scaling) hard-codes these.
MCORE_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

_HF_DEFAULTS = {  # LlamaConfig defaults, for keys a config.json may omit
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "rope_theta": 10000.0,
}


def _rope(cfg: Dict[str, Any], problems: List[str]) -> Dict[str, Any]:
    """Normalise transformers 4.x (`rope_theta` + `rope_scaling`) and 5.x (`rope_parameters`) spellings."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling")  # transformers 5 also gives rope_scaling precedence
    merged = dict(params)
    if scaling:
        merged.update(scaling)
    if isinstance(params, dict) and any(isinstance(v, dict) for v in params.values()):
        problems.append("rope_parameters nested per layer type is not a Llama config")
        return {}
    theta = merged.get("rope_theta", cfg.get("rope_theta", _HF_DEFAULTS["rope_theta"]))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    out = {"theta": float(theta), "type": rope_type}
    if float(theta) != int(float(theta)):
        problems.append(f"rope_theta={theta}: megatron-core's GPTModel takes an integer rotary_base")
    partial = merged.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        problems.append(f"partial_rotary_factor={partial}: only full-width RoPE is supported")
    if rope_type == "default":
        return out
    if rope_type != "llama3":
        problems.append(f"rope type {rope_type!r}: supported are default (no scaling) and llama3")
        return out
    if "factor" not in merged:
        problems.append("rope_scaling.rope_type=llama3 without a factor")
        return out
    out["factor"] = float(merged["factor"])
    for name, want in MCORE_LLAMA3_ROPE.items():
        got = merged.get(name, cfg.get("max_position_embeddings") if name == "original_max_position_embeddings" else None)
        if got is None or float(got) != float(want):
            problems.append(f"rope_scaling.{name}={got}: megatron-core's llama3 RoPE scaling is fixed at {want}")
    return out


def config_from_hf(cfg: Dict[str, Any], *, make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """HF `config.json` of a LlamaForCausalLM -> ModelConfig; every unsupported value is listed."""
    problems: List[str] = []
    get = lambda k: cfg.get(k, _HF_DEFAULTS.get(k))  # noqa: E731
    archs = cfg.get("architectures") or []
    if archs and "LlamaForCausalLM" not in archs:
        problems.append(f"architectures={archs}: this table converts LlamaForCausalLM")
    if cfg.get("model_type", "llama") != "llama":
        problems.append(f"model_type={cfg.get('model_type')!r}: expected 'llama'")
    required = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]
    missing = [k for k in required if k not in cfg]
    if missing:
        problems.append(f"missing required keys {missing}")
    if get("hidden_act") != "silu":
        problems.append(f"hidden_act={get('hidden_act')!r}: Llama's MLP is SwiGLU (silu)")
    if get("attention_bias"):
        problems.append("attention_bias=true: the megatron Llama model has no QKV/output biases")
    if get("mlp_bias"):
        problems.append("mlp_bias=true: the megatron Llama model has no MLP biases")
    rope = _rope(cfg, problems)
    if missing:
        raise ConversionError("HF config.json", {"unsupported config": problems})
    heads = int(cfg["num_attention_heads"])
    groups = int(cfg.get("num_key_value_heads") or heads)
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if heads % groups:
        problems.append(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={groups}")
    if problems:
        raise ConversionError("HF config.json", {"unsupported config": problems})
    return ModelConfig(
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(cfg["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim if head_dim != hidden // heads else None,
        vocab_size=int(cfg["vocab_size"]),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        max_position_embeddings=int(get("max_position_embeddings")),
        rotary_base=rope["theta"],
        rope_scaling=rope["type"] == "llama3",
        rope_scaling_factor=rope.get("factor", 8.0),
        norm_epsilon=float(get("rms_norm_eps")),
        tie_word_embeddings=bool(get("tie_word_embeddings")),
        init_method_std=float(get("initializer_range")),
        attention_dropout=float(get("attention_dropout") or 0.0),
    )


# Keys of a template config.json that describe the architecture: always recomputed from the ModelConfig.
_ARCH_KEYS = {
    "architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
    "rope_scaling", "rope_parameters", "tie_word_embeddings", "vocab_size", "attention_bias", "mlp_bias",
    "attention_dropout", "initializer_range", "torch_dtype", "dtype", "pretraining_tp", "partial_rotary_factor",
}


def config_to_hf(model: ModelConfig, *, dtype: str, template: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """ModelConfig -> LlamaForCausalLM config.json.  Non-architecture keys of `template` (token ids,
    transformers_version, ...) are kept.  RoPE is written in both the transformers 4.x spelling
    (`rope_theta` + `rope_scaling`) and the 5.x one (`rope_parameters`), consistently."""
    out: Dict[str, Any] = {k: v for k, v in (template or {}).items() if k not in _ARCH_KEYS}
    theta = float(model.rotary_base)
    scaling = None
    if model.rope_scaling:
        scaling = {"rope_type": "llama3", "factor": float(model.rope_scaling_factor), **MCORE_LLAMA3_ROPE}
    rope_parameters = {"rope_type": "default", "rope_theta": theta} if scaling is None else {**scaling, "rope_theta": theta}
    out.update({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "head_dim": model.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.norm_epsilon,
        "rope_theta": theta,
        "rope_scaling": scaling,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": model.tie_word_embeddings,
        "vocab_size": model.vocab_size,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": model.attention_dropout,
        "initializer_range": model.init_method_std,
        "pretraining_tp": 1,
        "torch_dtype": dtype,
        "dtype": dtype,
    })
    return out


LLAMA = ModelTable(
    name="llama",
    hf_architectures=("LlamaForCausalLM",),
    hf_model_types=("llama",),
    rules=RULES,
    tied_copies=TIED_COPIES,
    drops=DROPS,
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
)
