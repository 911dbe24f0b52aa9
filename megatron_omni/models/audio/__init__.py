"""Audio encoders (Whisper-style on megatron-core layers; Paraformer-style SANM with LFR) and the
audio connector.  Their section (`AudioConfig`) and the one length rule shared by models and data
(`audio_token_count`) are `megatron_omni.config.encoders`, re-exported here."""

from megatron_omni.config.encoders import AudioConfig, audio_token_count, encoder_frame_count
from megatron_omni.models.audio.connector import AudioConnector
from megatron_omni.models.audio.sanm import SANMEncoder, lfr_stack
from megatron_omni.models.audio.whisper import WhisperStyleEncoder, encoder_transformer_config, build_audio_encoder

__all__ = [
    "AudioConfig",
    "audio_token_count",
    "encoder_frame_count",
    "AudioConnector",
    "WhisperStyleEncoder",
    "encoder_transformer_config",
    "build_audio_encoder",
    "SANMEncoder",
    "lfr_stack",
]
