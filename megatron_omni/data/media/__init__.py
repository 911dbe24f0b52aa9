"""Media decoding for omni samples: images, video and audio -> encoder inputs.

    from megatron_omni.data.media import MediaError, load_image, load_video, load_audio
    image = load_image(path, vision=vision_cfg, max_tokens=1280)          # VisualInput
    clip = load_video(path, vision=vision_cfg, max_frames=64, max_tokens=2560, sampling="fps", fps=2.0)
    feats = load_audio(path, audio=audio_cfg)                               # [frames, 80] log-mel fbank

Backends (chosen per file, logged once, forceable; see `backends`): DALI (CPU operators, or nvJPEG /
NVDEC on GPU machines) when it can read the file, else PIL for images and PyAV (FFmpeg) for video
codecs DALI's CPU decoder lacks (H.264, HEVC, AV1) and audio formats it lacks (MP3, AAC).
Bad media raise MediaError (path + reason); the loader skips, counts and logs them.
`synth` writes synthetic test media.
"""

from megatron_omni.data.media.audio import load_audio, load_waveform
from megatron_omni.data.media.errors import MediaError
from megatron_omni.data.media.geometry import image_grid, plan_video
from megatron_omni.data.media.image import load_image
from megatron_omni.data.media.patches import CLIP_MEAN, CLIP_STD, VisualInput, frames_to_patches
from megatron_omni.data.media.video import load_video

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "MediaError", "VisualInput", "frames_to_patches", "image_grid", "load_audio",
    "load_image", "load_video", "load_waveform", "plan_video",
]
