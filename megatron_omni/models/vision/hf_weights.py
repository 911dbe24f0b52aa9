"""HF Qwen2-VL vision-tower weights <-> NaViTEncoder (megatron) names and layouts.

Pure tensor mapping (no `transformers` import).  HF names are those of
``Qwen2VisionTransformerPretrainedModel.state_dict()`` (``model.visual.`` prefix stripped).

QKV: HF's fused ``attn.qkv`` is ``[3*D, D]`` ordered ``[q; k; v]`` (each ``[H*d, D]``); megatron's
``linear_qkv`` for MHA (num_query_groups = heads) is ordered per head ``[q_h; k_h; v_h]`` for
h = 0..H-1, so it column-splits over TP by heads.  Converted explicitly both ways.
"""

from __future__ import annotations

from typing import Dict

import torch
from megatron.core import parallel_state
from torch import Tensor

from megatron_omni.config.encoders import VisionConfig

__all__ = ["hf_to_megatron", "megatron_to_hf", "load_hf_state_dict", "qkv_hf_to_megatron", "qkv_megatron_to_hf"]


def qkv_hf_to_megatron(t: Tensor, num_heads: int) -> Tensor:
    """[3*H*d, ...] ordered [q; k; v] -> [H*3*d, ...] ordered per head [q_h; k_h; v_h]."""
    rest = t.shape[1:]
    return t.reshape(3, num_heads, -1, *rest).transpose(0, 1).reshape(t.shape)


def qkv_megatron_to_hf(t: Tensor, num_heads: int) -> Tensor:
    rest = t.shape[1:]
    return t.reshape(num_heads, 3, -1, *rest).transpose(0, 1).reshape(t.shape)


def _layer_map(te: bool) -> Dict[str, str]:
    """HF block-local name -> megatron layer-local name."""
    ln1 = "self_attention.linear_qkv.layer_norm_" if te else "input_layernorm."
    ln2 = "mlp.linear_fc1.layer_norm_" if te else "pre_mlp_layernorm."
    return {
        "norm1.weight": ln1 + "weight",
        "norm1.bias": ln1 + "bias",
        "attn.qkv.weight": "self_attention.linear_qkv.weight",
        "attn.qkv.bias": "self_attention.linear_qkv.bias",
        "attn.proj.weight": "self_attention.linear_proj.weight",
        "attn.proj.bias": "self_attention.linear_proj.bias",
        "norm2.weight": ln2 + "weight",
        "norm2.bias": ln2 + "bias",
        "mlp.fc1.weight": "mlp.linear_fc1.weight",
        "mlp.fc1.bias": "mlp.linear_fc1.bias",
        "mlp.fc2.weight": "mlp.linear_fc2.weight",
        "mlp.fc2.bias": "mlp.linear_fc2.bias",
    }


_TOP = {
    "patch_embed.proj.weight": "patch_embed.weight",
    "merger.ln_q.weight": "merger.layernorm.weight",
    "merger.ln_q.bias": "merger.layernorm.bias",
    "merger.mlp.0.weight": "merger.linear_fc1.weight",
    "merger.mlp.0.bias": "merger.linear_fc1.bias",
    "merger.mlp.2.weight": "merger.linear_fc2.weight",
    "merger.mlp.2.bias": "merger.linear_fc2.bias",
}


def hf_to_megatron(hf: Dict[str, Tensor], cfg: VisionConfig, *, te: bool = False) -> Dict[str, Tensor]:
    """Full (unsharded) megatron state of NaViTEncoder from an HF vision-tower state dict."""
    out: Dict[str, Tensor] = {}
    layer = _layer_map(te)
    for name, t in hf.items():
        if name.startswith("model.visual."):
            name = name[len("model.visual."):]
        elif name.startswith("visual."):
            name = name[len("visual."):]
        if name in _TOP:
            out[_TOP[name]] = t
            continue
        parts = name.split(".", 2)
        if parts[0] != "blocks" or parts[2] not in layer:
            raise KeyError(f"unexpected HF vision weight {name!r}")
        if "attn.qkv" in parts[2]:
            t = qkv_hf_to_megatron(t, cfg.num_attention_heads)
        out[f"decoder.layers.{parts[1]}.{layer[parts[2]]}"] = t
    return out


def megatron_to_hf(mc: Dict[str, Tensor], cfg: VisionConfig, *, te: bool = False) -> Dict[str, Tensor]:
    """Inverse of :func:`hf_to_megatron` (full tensors; TE `_extra_state` entries skipped)."""
    top = {v: k for k, v in _TOP.items()}
    layer = {v: k for k, v in _layer_map(te).items()}
    out: Dict[str, Tensor] = {}
    for name, t in mc.items():
        if name.endswith("_extra_state"):
            continue
        if name in top:
            out[top[name]] = t
            continue
        parts = name.split(".", 3)  # decoder, layers, i, rest
        hf_local = layer[parts[3]]
        if "attn.qkv" in hf_local:
            t = qkv_megatron_to_hf(t, cfg.num_attention_heads)
        out[f"blocks.{parts[2]}.{hf_local}"] = t
    return out


@torch.no_grad()
def load_hf_state_dict(encoder, hf: Dict[str, Tensor]) -> None:
    """Copy HF vision-tower weights into `encoder` (a NaViTEncoder), taking this rank's TP shard of
    every tensor-parallel parameter (split along its `partition_dim`; the layouts above make a plain
    contiguous split correct for QKV (per-head) and for the non-gated fc1)."""
    full = hf_to_megatron(hf, encoder.cfg, te=encoder.kernels.transformer_engine)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    params = dict(encoder.named_parameters())
    missing = set(params) - set(full)
    if missing:
        raise KeyError(f"no HF weight for {sorted(missing)}")
    for name, p in params.items():
        t = full[name]
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            t = t.chunk(tp, dim=p.partition_dim)[rank]
        if t.shape != p.shape:
            raise ValueError(f"{name}: HF shape {tuple(t.shape)} vs local {tuple(p.shape)}")
        p.copy_(t.to(p.dtype))
