"""Omni export tests: a TP2 x PP2 omni checkpoint from a short tiny training run, one mixed
image + video + audio + text sample, and the megatron forward of a checkpoint (megatron's own loader,
resharded to one rank) on it."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

from tests.helpers.launch import train

CONFIG = "configs/tiny/omni_mock.yaml"
# One optimizer step (every weight moves off its init: biases and norms are not 0 / 1 any more), one
# microbatch per modality (balance.mode=accumulation), TP2 x PP2 with an uneven first stage.
RUN = ["parallel.tp=2", "parallel.pp=2", "parallel.first_stage_num_layers=1", "train.steps=1",
       "train.save_interval=1", "data.seq_length=64", "train.micro_batch_size=1", "train.global_batch_size=5",
       "optimizer.lr=2e-2", "optimizer.lr_warmup_steps=0"]

IMAGE_GRID = [[1, 4, 6]]  # 6 merged tokens
VIDEO_GRID = [[2, 4, 4]]  # 8 merged tokens (2 temporal patches)
AUDIO_FRAMES = [37, 20]  # two clips of different lengths (padded batch): 5 + 3 tokens
GREEDY_STEPS = 4  # greedy tokens compared with HF generate()


def omni_run(root: Path) -> Path:
    """A training run's checkpoints/ folder (tiny omni model, TP2 x PP2, one step)."""
    train(4, root / "run", RUN, cache_dir=root / "cache", config=CONFIG)
    return root / "run" / "checkpoints"


def run_configs(ckpt: Path):
    from megatron_omni.convert.omni_export import omni_configs

    model, omni, _ = omni_configs(str(ckpt))
    return model, omni


def mixed_sample(model, omni, seed: int = 0) -> Dict[str, torch.Tensor]:
    """text <image>..</image> text <video>..</video> <audio>..</audio> text <audio>..</audio> text."""
    from megatron_omni.config.encoders import audio_token_count
    from megatron_omni.models.omni import omni_vocab
    from megatron_omni.models.rope import mrope_position_ids

    vocab = omni_vocab(model, omni)
    g = torch.Generator().manual_seed(seed)

    def text(n):
        return torch.randint(3, vocab.text_vocab_size, (n,), generator=g).tolist()

    image, video = torch.tensor(IMAGE_GRID), torch.tensor(VIDEO_GRID)
    m2 = omni.vision.spatial_merge_size ** 2
    span = {"image": int(image.prod(-1).sum()) // m2, "video": int(video.prod(-1).sum()) // m2}
    ids = text(5) + [vocab.id("<image>")] + [vocab.image_pad_id] * span["image"] + [vocab.id("</image>")] + text(3)
    ids += [vocab.id("<video>")] + [vocab.video_pad_id] * span["video"] + [vocab.id("</video>")]
    for n in AUDIO_FRAMES:
        ids += [vocab.id("<audio>")] + [vocab.audio_pad_id] * int(audio_token_count(n, omni.audio))
        ids += [vocab.id("</audio>")] + text(2)
    ids += [vocab.audio_code_id(7)] + text(4)
    input_ids = torch.tensor([ids])
    positions, _ = mrope_position_ids(input_ids, image, video, image_token_id=vocab.image_pad_id,
                                      video_token_id=vocab.video_pad_id,
                                      spatial_merge_size=omni.vision.spatial_merge_size)
    lengths = torch.tensor(AUDIO_FRAMES)
    feats = torch.zeros(len(AUDIO_FRAMES), max(AUDIO_FRAMES), omni.audio.num_mel_bins)
    for i, n in enumerate(AUDIO_FRAMES):
        feats[i, :n] = torch.randn(n, omni.audio.num_mel_bins, generator=g)
    patch = omni.vision.patch_dim
    return {"input_ids": input_ids, "position_ids": positions,
            "pixel_values": torch.randn(int(image.prod(-1).sum()), patch, generator=g), "image_grid_thw": image,
            "pixel_values_videos": torch.randn(int(video.prod(-1).sum()), patch, generator=g),
            "video_grid_thw": video, "audio_features": feats, "audio_lengths": lengths}


def hf_inputs(sample) -> Dict[str, torch.Tensor]:
    """The sample as MegatronOmniForCausalLM's keywords (Whisper layout [clips, n_mels, frames])."""
    return {"input_ids": sample["input_ids"], "pixel_values": sample["pixel_values"],
            "image_grid_thw": sample["image_grid_thw"], "pixel_values_videos": sample["pixel_values_videos"],
            "video_grid_thw": sample["video_grid_thw"], "input_features": sample["audio_features"].transpose(1, 2),
            "audio_feature_lengths": sample["audio_lengths"]}


def megatron_model(ckpt: Path, seq_length: int):
    """The checkpoint in a single-rank OmniModel (fp32), loaded by training/checkpoint.py (megatron's
    dist_checkpointing resharding TP2 x PP2 -> TP1).  Call inside `megatron_world()`."""
    from megatron_omni.config import ParallelConfig
    from megatron_omni.models.omni import build_omni_chunks
    from megatron_omni.training.checkpoint import load_checkpoint
    from megatron_omni.training.setup import TrainState

    model_cfg, omni = run_configs(ckpt)
    chunks = build_omni_chunks(model_cfg, ParallelConfig(), omni, seq_length=seq_length, params_dtype=torch.float32)
    load_checkpoint(TrainState(model=chunks, optimizer=None, scheduler=None), str(ckpt), finetune=True)
    (model,) = chunks
    return model.eval()


def megatron_logits(model, sample) -> torch.Tensor:
    """[1, S, vocab] logits of the mixed sample (causal mask over the one sample)."""
    ids = sample["input_ids"]
    B, S = ids.shape
    mask, packed = model.packed_row_attention(torch.arange(B + 1, dtype=torch.int32) * S, B, S)  # a sample a row
    with torch.no_grad():
        out = model(ids, sample["position_ids"], mask, packed_seq_params=packed, pixel_values=sample["pixel_values"],
                    image_grid_thw=sample["image_grid_thw"], pixel_values_videos=sample["pixel_values_videos"],
                    video_grid_thw=sample["video_grid_thw"], audio_features=sample["audio_features"],
                    audio_lengths=sample["audio_lengths"])
    return out[..., : model.vocab.size].float()


def megatron_greedy(model, sample, vocab, steps):
    """Megatron greedy decoding without a cache: the whole sequence each step, M-RoPE ids recomputed."""
    from megatron_omni.models.rope import mrope_position_ids

    s = dict(sample)
    for _ in range(steps):
        nxt = megatron_logits(model, s)[:, -1].argmax(-1, keepdim=True)
        s["input_ids"] = torch.cat([s["input_ids"], nxt], dim=1)
        s["position_ids"], _ = mrope_position_ids(
            s["input_ids"], s["image_grid_thw"], s["video_grid_thw"], image_token_id=vocab.image_pad_id,
            video_token_id=vocab.video_pad_id, spatial_merge_size=2)
    return s["input_ids"][0, -steps:].tolist()
