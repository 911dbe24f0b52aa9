"""Tiny random HF encoder folders (made with transformers, fp32, no download) for the omni import tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import torch

# The tiny vision tower: ViT width 32, 2 blocks, 4 heads, 2x2 merge; the merger projects to 64 (the tiny
# LLM width, so the whole merger is copied).
VISION = dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=4, hidden_size=64, in_channels=3, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2)


def _perturb_norms(model: torch.nn.Module) -> None:
    """Norm weights / biases away from 1 / 0, so that a misplaced norm shows in a comparison."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)


def make_hf_qwen2vl(path: Path, seed: int = 1, **vision) -> Path:
    """A whole Qwen2VLForConditionalGeneration (tiny 1-layer language model) saved with save_pretrained."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Qwen2VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=300,
                         rope_parameters={"rope_type": "mrope", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config={**VISION, **vision})
    model = Qwen2VLForConditionalGeneration(cfg).float()
    _perturb_norms(model)
    model.save_pretrained(path)
    return path


def make_hf_whisper(path: Path, seed: int = 2, **overrides) -> Path:
    """A WhisperModel (encoder 2 layers, width 32, 4 heads; a 1-layer decoder the import drops);
    `overrides` change its WhisperConfig (max_source_positions=750 takes 15 s clips)."""
    from transformers import WhisperConfig, WhisperModel

    torch.manual_seed(seed)
    kw = dict(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, decoder_layers=1,
              decoder_attention_heads=4, decoder_ffn_dim=64, num_mel_bins=80, max_source_positions=64,
              max_target_positions=32, vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              decoder_start_token_id=1)
    cfg = WhisperConfig(**{**kw, **overrides})
    model = WhisperModel(cfg).float()
    _perturb_norms(model)
    with torch.no_grad():  # q/v biases non-zero
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(path)
    return path


def folder_tensors(path: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors folder."""
    from safetensors.torch import load_file

    out: Dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def edit_config(path: Path, **changes) -> None:
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for dotted, value in changes.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    cfg_path.write_text(json.dumps(cfg))


def make_hf_vision_tower(path: Path, seed: int = 3, **vision) -> Path:
    """A standalone Qwen2-VL vision tower (Qwen2VisionTransformerPretrainedModel) saved with save_pretrained."""
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    torch.manual_seed(seed)
    model = Qwen2VisionTransformerPretrainedModel(Qwen2VLVisionConfig(**{**VISION, **vision})).float()
    _perturb_norms(model)
    model.save_pretrained(path)
    return path
