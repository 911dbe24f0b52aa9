"""Copy a Hugging Face Whisper encoder state dict into `WhisperStyleEncoder` (tests / conversion).

Names: conv1/conv2 -> conv1/conv2; embed_positions.weight -> position_embedding;
layers.i.self_attn_layer_norm -> decoder.layers.i.input_layernorm; self_attn.{q,k,v}_proj ->
decoder.layers.i.self_attention.linear_qkv (fused); self_attn.out_proj -> ...linear_proj;
final_layer_norm -> pre_mlp_layernorm; fc1/fc2 -> mlp.linear_fc1/linear_fc2; layer_norm ->
decoder.final_layernorm.  QKV fusion follows megatron's MHA layout: rows grouped per head as
[q_h; k_h; v_h] (head_dim rows each); k's missing bias is written as zeros.  Single TP rank only
(the full, unsharded tensors).
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, num_heads: int) -> Tensor:
    """[h*hd, ...] x3 -> [h*3*hd, ...] with per-head [q_h, k_h, v_h] blocks."""
    hd = q.shape[0] // num_heads
    parts = [t.reshape(num_heads, hd, *t.shape[1:]) for t in (q, k, v)]
    return torch.stack(parts, dim=1).reshape(3 * q.shape[0], *q.shape[1:])


def whisper_hf_to_megatron(hf: Dict[str, Tensor], num_layers: int, num_heads: int) -> Dict[str, Tensor]:
    hf = {k.removeprefix("model.").removeprefix("encoder."): v for k, v in hf.items()}
    out = {
        "conv1.weight": hf["conv1.weight"], "conv1.bias": hf["conv1.bias"],
        "conv2.weight": hf["conv2.weight"], "conv2.bias": hf["conv2.bias"],
        "position_embedding": hf["embed_positions.weight"],
        "decoder.final_layernorm.weight": hf["layer_norm.weight"],
        "decoder.final_layernorm.bias": hf["layer_norm.bias"],
    }
    for i in range(num_layers):
        s, d = f"layers.{i}.", f"decoder.layers.{i}."
        q_w, k_w, v_w = (hf[s + f"self_attn.{n}_proj.weight"] for n in "qkv")
        q_b, v_b = hf[s + "self_attn.q_proj.bias"], hf[s + "self_attn.v_proj.bias"]
        out[d + "self_attention.linear_qkv.weight"] = fuse_qkv(q_w, k_w, v_w, num_heads)
        out[d + "self_attention.linear_qkv.bias"] = fuse_qkv(q_b, torch.zeros_like(q_b), v_b, num_heads)
        for src, dst in (("self_attn.out_proj", "self_attention.linear_proj"), ("fc1", "mlp.linear_fc1"),
                         ("fc2", "mlp.linear_fc2"), ("self_attn_layer_norm", "input_layernorm"),
                         ("final_layer_norm", "pre_mlp_layernorm")):
            out[d + dst + ".weight"] = hf[s + src + ".weight"]
            out[d + dst + ".bias"] = hf[s + src + ".bias"]
    return out


@torch.no_grad()
def load_hf_whisper_encoder(model, hf_state: Dict[str, Tensor]) -> None:
    """Copy weights into `model` (a WhisperStyleEncoder); the connector is left as initialised."""
    a = model.audio
    sd = whisper_hf_to_megatron(hf_state, a.num_layers, a.num_attention_heads)
    own = dict(model.named_parameters())
    missing = [n for n in own if not n.startswith("connector.") and n not in sd]
    if missing:
        raise KeyError(f"no HF source for {missing}")
    for name, t in sd.items():
        own[name].copy_(t.to(own[name].dtype))
