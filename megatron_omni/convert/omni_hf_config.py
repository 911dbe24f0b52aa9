"""config.json / generation / preprocessor configs of an exported omni HF folder (pure dicts, no transformers).

The folder's `config.json` is a `MegatronOmniConfig` (megatron_omni/hf/configuration_megatron_omni.py):
the LLM as a LlamaConfig (convert/llama.py's `config_to_hf`, with the omni vocabulary), the vision
tower as a Qwen2VLVisionConfig, the audio encoder as WhisperConfig encoder fields (or the FunASR
SAN-M fields), and the omni token ids.  Settings transformers' modules hard-code (Qwen2-VL's LayerNorm
eps 1e-6 and rotary theta 10000, Whisper's LayerNorm eps 1e-5 and its k3 / stride-2 convs) are checked:
a model that differs is refused rather than exported into a folder that would compute something else.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from megatron_omni.config.schema import ModelConfig, OmniConfig
from megatron_omni.convert.llama import LLAMA
from megatron_omni.config.encoders import AudioConfig, VisionConfig
from megatron_omni.models.omni_vocab import SPECIAL_TOKENS, OmniVocab

ARCHITECTURE = "MegatronOmniForCausalLM"
# config.json key holding the exact {model, omni} bundle, so that hf-to-mcore reads the folder back as it was.
BUNDLE_KEY = "megatron_omni_bundle"
MODEL_TYPE = "megatron_omni"
AUTO_MAP = {
    "AutoConfig": "configuration_megatron_omni.MegatronOmniConfig",
    "AutoModel": "modeling_megatron_omni.MegatronOmniForCausalLM",
    "AutoModelForCausalLM": "modeling_megatron_omni.MegatronOmniForCausalLM",
}


def vision_problems(v: VisionConfig) -> List[str]:
    out = []
    if v.norm_epsilon != 1e-6:
        out.append(f"omni.vision.norm_epsilon={v.norm_epsilon}: Qwen2-VL's vision blocks use LayerNorm eps 1e-6")
    if v.rotary_base != 10000.0:
        out.append(f"omni.vision.rotary_base={v.rotary_base}: Qwen2-VL's vision rotary has theta 10000")
    if v.ffn_hidden_size % v.hidden_size:
        out.append(f"omni.vision.ffn_hidden_size={v.ffn_hidden_size} is not an integer multiple (mlp_ratio) of "
                   f"hidden_size={v.hidden_size}")
    return out


def audio_problems(a: AudioConfig) -> List[str]:
    out = []
    if a.encoder_type == "whisper":
        if a.layernorm_epsilon != 1e-5:
            out.append(f"omni.audio.layernorm_epsilon={a.layernorm_epsilon}: Whisper's LayerNorms use eps 1e-5")
        if (a.conv_kernel_size, a.conv2_stride) != (3, 2):
            out.append(f"omni.audio conv_kernel_size={a.conv_kernel_size}, conv2_stride={a.conv2_stride}: "
                       "Whisper's front end is kernel 3, stride 2")
    return out


def vision_config(v: VisionConfig) -> Dict:
    return {"model_type": "qwen2_vl_vision", "depth": v.depth, "embed_dim": v.hidden_size,
            "hidden_size": v.out_hidden_size, "num_heads": v.num_attention_heads,
            "mlp_ratio": v.ffn_hidden_size // v.hidden_size, "hidden_act": v.activation,
            "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size, "in_channels": v.in_channels,
            "spatial_merge_size": v.spatial_merge_size, "initializer_range": v.init_method_std}


def audio_config(a: AudioConfig) -> Dict:
    connector = {"downsample_factor": a.downsample_factor, "connector_hidden_size": a.connector_hidden_size,
                 "out_hidden_size": a.out_hidden_size}
    if a.encoder_type == "whisper":
        return {"encoder_type": "whisper", "num_mel_bins": a.num_mel_bins, "d_model": a.d_model,
                "encoder_layers": a.num_layers, "encoder_attention_heads": a.num_attention_heads,
                "encoder_ffn_dim": a.ffn_hidden_size, "max_source_positions": a.max_source_positions,
                "position_embedding": a.position_embedding, **connector}
    return {"encoder_type": "sanm", "num_mel_bins": a.num_mel_bins, "d_model": a.d_model, "num_layers": a.num_layers,
            "num_attention_heads": a.num_attention_heads, "ffn_hidden_size": a.ffn_hidden_size,
            "lfr_m": a.lfr_m, "lfr_n": a.lfr_n, "kernel_size": a.sanm_kernel_size, "sanm_shift": a.sanm_shift,
            "layernorm_epsilon": a.layernorm_epsilon, "max_source_positions": a.max_source_positions, **connector}


def omni_config(model: ModelConfig, omni: OmniConfig, vocab: OmniVocab, *, dtype: str,
                template: Optional[Dict] = None, bundle: Optional[Dict] = None) -> Dict:
    """config.json of the omni folder; `model` has the omni vocabulary as vocab_size; `bundle` is the
    checkpoint's {model, omni} config (stored under BUNDLE_KEY)."""
    text = LLAMA.config_to_hf(model, dtype=dtype, template=template)
    ids = vocab.special_ids
    cfg = {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "auto_map": dict(AUTO_MAP),
        "text_config": text,
        "vision_config": vision_config(omni.vision) if omni.vision is not None else None,
        "audio_config": audio_config(omni.audio) if omni.audio is not None else None,
        "mrope_section": list(omni.mrope_section),
        "image_token_id": vocab.image_pad_id, "video_token_id": vocab.video_pad_id,
        "audio_token_id": vocab.audio_pad_id, "special_token_ids": ids,
        "text_vocab_size": vocab.text_vocab_size, "audio_codebook_size": vocab.audio_codebook_size,
        "audio_code_offset": vocab.audio_code_offset,
        "tie_word_embeddings": model.tie_word_embeddings, "torch_dtype": dtype, "dtype": dtype,
        BUNDLE_KEY: bundle,
    }
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if text.get(k) is not None:
            cfg[k] = text[k]
    return cfg


def generation_config(config: Dict, vocab: OmniVocab) -> Dict:
    """Stop at <|eot_id|> (the chat template's turn end) or the text tokenizer's own eos."""
    eos = [vocab.id("<|eot_id|>")]
    native = config.get("eos_token_id")
    for e in (native if isinstance(native, list) else [native]):
        if e is not None and e not in eos:
            eos.append(e)
    out = {"_from_model_config": True, "eos_token_id": eos}
    if config.get("bos_token_id") is not None:
        out["bos_token_id"] = config["bos_token_id"]
    return out


PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_megatron_omni.MegatronOmniProcessor"}
# The processor's default media limits: paper Table 2's last stages (IT3 / AT), which the released model
# finishes with: 2560 image tokens, 128 video frames (the clip shares the image token limit).
PROCESSOR_LIMITS = {"max_image_tokens": 2560, "max_video_frames": 128, "max_video_tokens": None}


def _vision_media(omni: OmniConfig) -> Optional[Dict]:
    from megatron_omni.data.media.patches import CLIP_MEAN, CLIP_STD

    v = omni.vision
    if v is None:
        return None
    return {"patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
            "merge_size": v.spatial_merge_size, "in_channels": v.in_channels,
            "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}


def _audio_media(omni: OmniConfig) -> Optional[Dict]:
    from megatron_omni.data.media.fbank import FRAME_LENGTH_MS, FRAME_SHIFT_MS, KALDI_WAVE_SCALE

    a = omni.audio
    if a is None:
        return None
    return {"type": "kaldi_fbank", "encoder_type": a.encoder_type, "num_mel_bins": a.num_mel_bins,
            "sampling_rate": 16000, "frame_length_ms": FRAME_LENGTH_MS, "frame_shift_ms": FRAME_SHIFT_MS,
            "wave_scale": KALDI_WAVE_SCALE, "conv2_stride": a.conv2_stride, "lfr_n": a.lfr_n,
            "downsample_factor": a.downsample_factor, "max_input_frames": a.max_input_frames}


def preprocessor_config(omni: OmniConfig) -> Dict:
    """Qwen2-VL image processor settings of our patching (CLIP normalisation, 14px patches, 2x2 merge), and
    the audio front end the model was trained on (Kaldi log-mel fbank, 16 kHz, 25 / 10 ms, int16 scale);
    `auto_map` names the folder's processor (processing_megatron_omni.py)."""
    out: Dict = {"processor_class": "MegatronOmniProcessor", "auto_map": dict(PROCESSOR_AUTO_MAP)}
    vision = _vision_media(omni)
    if vision is not None:
        out.update({"image_processor_type": "Qwen2VLImageProcessor", "patch_size": vision["patch_size"],
                    "temporal_patch_size": vision["temporal_patch_size"], "merge_size": vision["merge_size"],
                    "image_mean": vision["image_mean"], "image_std": vision["image_std"], "do_rescale": True,
                    "rescale_factor": 1 / 255, "do_normalize": True, "do_resize": True})
    audio = _audio_media(omni)
    if audio is not None:
        out["audio_frontend"] = {**audio, "input": "input_features [clips, num_mel_bins, frames] + "
                                                   "audio_feature_lengths"}
    return out


def processor_config(omni: OmniConfig) -> Dict:
    """processor_config.json: MegatronOmniProcessor's arguments (its media rules' settings, the default
    limits, the chat template's system prompt)."""
    from megatron_omni.data.chat_template import DEFAULT_SYSTEM_PROMPT

    return {"processor_class": "MegatronOmniProcessor", "auto_map": dict(PROCESSOR_AUTO_MAP),
            "vision": _vision_media(omni), "audio": _audio_media(omni), **PROCESSOR_LIMITS,
            "system_prompt": DEFAULT_SYSTEM_PROMPT}


def special_token_names(vocab: OmniVocab) -> List[str]:
    """Token strings of every id past the text vocabulary, in id order: the omni specials, then the
    audio output codes <|a_0|> ... (CosyVoice-style names)."""
    return list(SPECIAL_TOKENS) + [f"<|a_{i}|>" for i in range(vocab.audio_codebook_size)]
