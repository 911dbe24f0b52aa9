"""Encoder FLOP accounting vs torch.utils.flop_counter on the real tiny encoders (forward).

One image / one clip per check, so the local attention's full-mask matmuls equal the formula's
per-segment sum of squares."""

from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_omni.config.encoders import AudioConfig, VisionConfig
from megatron_omni.training.encoder_flops import audio_forward_flops, vision_forward_flops

REPO = Path(__file__).resolve().parents[2]


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_vision_and_audio_forward_flops_match_flop_counter():
    from megatron_omni.convert.mcore_io import megatron_world
    from megatron_omni.models.audio.whisper import build_audio_encoder
    from megatron_omni.models.vision.encoder import NaViTEncoder

    vcfg = VisionConfig.from_yaml(str(REPO / "configs/model/vision_tiny.yaml"))
    acfg = AudioConfig.from_yaml(str(REPO / "configs/model/audio_tiny.yaml"))
    with megatron_world():
        # the dense block-mask path: torch's FLOP counter has no formula for the CPU SDPA kernel the
        # THD path runs (it counts 0 there), it counts these matmuls
        vision = NaViTEncoder(vcfg, packed_attention="dense")
        grid = torch.tensor([[1, 6, 8]])
        pixels = torch.randn(48, vcfg.patch_dim)
        assert _counted(lambda: vision(pixels, grid)) == vision_forward_flops(vcfg, grid)
        audio = build_audio_encoder(acfg)
        frames = torch.tensor([37])
        feats = torch.randn(1, acfg.num_mel_bins, 37)
        counted = _counted(lambda: audio(feats, frames))
        # the two front-end convolutions are left out of the formula (as Megatron-LM leaves out
        # embeddings); add them to compare: conv1 k=3 on 37 frames, conv2 k=3 stride 2 -> 19 frames
        d, k = acfg.d_model, acfg.conv_kernel_size
        convs = 2 * 37 * acfg.num_mel_bins * d * k + 2 * 19 * d * d * k
        assert counted == audio_forward_flops(acfg, frames) + convs
