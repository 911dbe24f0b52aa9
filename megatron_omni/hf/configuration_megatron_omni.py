"""MegatronOmniConfig: an M2-omni model exported by megatron-omni (remote code; transformers only).

    text_config    LlamaConfig of the LLM (vocab_size = the omni vocabulary: text ids, the omni special
                   tokens, the audio output codes)
    vision_config  Qwen2VLVisionConfig of the vision tower (NaViT + 2x2 PatchMerger to the LLM width)
    audio_config   dict: {"encoder_type": "whisper", WhisperConfig encoder fields} or
                   {"encoder_type": "sanm", FunASR SANMEncoder fields}, plus the connector
                   (downsample_factor, connector_hidden_size, out_hidden_size)
    mrope_section  M-RoPE (t, h, w) split of head_dim / 2 rotary frequencies
    image_token_id / video_token_id / audio_token_id   the <image_pad> / <video_pad> / <audio_pad> ids
"""

from transformers import LlamaConfig, PretrainedConfig
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig


class MegatronOmniConfig(PretrainedConfig):
    model_type = "megatron_omni"
    sub_configs = {"text_config": LlamaConfig, "vision_config": Qwen2VLVisionConfig}

    def __init__(self, text_config=None, vision_config=None, audio_config=None, mrope_section=(16, 24, 24),
                 image_token_id=None, video_token_id=None, audio_token_id=None, special_token_ids=None,
                 text_vocab_size=None, audio_codebook_size=0, audio_code_offset=None, **kwargs):
        if isinstance(text_config, dict):
            text_config = LlamaConfig(**text_config)
        self.text_config = text_config if text_config is not None else LlamaConfig()
        if isinstance(vision_config, dict):
            vision_config = Qwen2VLVisionConfig(**vision_config)
        self.vision_config = vision_config
        self.audio_config = dict(audio_config) if audio_config is not None else None
        self.mrope_section = list(mrope_section)
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.audio_token_id = audio_token_id
        self.special_token_ids = dict(special_token_ids or {})
        self.text_vocab_size = text_vocab_size
        self.audio_codebook_size = audio_codebook_size
        self.audio_code_offset = audio_code_offset
        kwargs.setdefault("tie_word_embeddings", getattr(self.text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)
