"""The omni side of a plan: what a stage trains, what its microbatches feed the encoders, and
what that costs the first pipeline stage (where the encoders live, `models/omni.py`).

What is read from the stage config (nothing here is a new hyper-parameter):

* trainable modules: `omni.freeze` (paper Table 2 "trainable modules") and `lora` (AT);
* the modality of every pipeline microbatch: `ModalityRoundScheduler` on the `balance` section
  (or the loop's default plan, `training/omni_data.py`), the pure-text share of Sec. 3.3;
* media sizes: the blend's Table 2 limits (`max_image_tokens`, `max_video_frames`) and its clip
  budget (`max_video_tokens`, else `max_image_tokens`, as the loader's `plan_video` applies it);
* DPO (`dpo:`): the trainer runs preference rows without context parallelism.

Attention work of a packed row: causal inside each sample, nothing across (the THD paths and the
dense block-diagonal mask compute the same products), so a row of samples L_1..L_n costs
sum L_i^2 (`training/flops.py`).  `row_segments` models the samples of a row: one per media item
(with its share of the row's text) and `MediaAssumptions.text_sample_tokens` for text rows.

What the planner cannot see in a config -- how much of a packed row is media, how long the
audio clips are -- is a `MediaAssumptions`, printed with every plan and overridable.

Work per module and microbatch, in forward passes (`training/encoder_flops.module_passes`, the
rule the training logs count by, so predicted and logged TFLOP/s compare): 3 when the module
trains (forward, dgrad, wgrad), 2 when it is frozen but a module before it trains (forward + the
activation gradient that must flow through it; PT-1's frozen LLM carries the connectors'
gradients, AT's frozen LLM its LoRA adapters'), 1 when nothing before it trains (forward only,
autograd keeps nothing).  Step time adds one forward for recomputed encoders; model FLOPs do not.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from megatron_omni.balance import ModalityRoundScheduler, SchedulerConfig
from megatron_omni.balance.config import TEXT
from megatron_omni.config.loader import ConfigError
from megatron_omni.config.schema import OMNI_MODULES, OmniConfig, RunConfig
from megatron_omni.config.encoders import AudioConfig, VisionConfig, audio_token_count, encoder_frame_count
from megatron_omni.training.encoder_flops import (
    audio_forward_flops_by_module,
    module_passes,
    module_trains,
    vision_forward_flops_by_module,
)

ENCODER_MODULES = tuple(m for m in OMNI_MODULES if m != "llm")
# Which encoder a modality's media go through.
MEDIA_ENCODER = {"image": "vision", "video": "vision", "audio": "audio"}
FBANK_FRAMES_PER_S = 100  # 10 ms hop (data/media: Kaldi fbank)


@dataclass(frozen=True)
class MediaAssumptions:
    """Media in one packed row, per modality -- properties of the data, not of the config.

    `media_fraction`: share of a row's LLM tokens that are encoder outputs (the rest is text:
    prompts, answers, chat template).  Images and video frames take their stage's Table 2
    limit (`max_image_tokens`, `max_video_frames`) -- an upper bound; audio clips last
    `audio_seconds`.  Modalities not listed (text, DPO preference rows) carry no media.
    `text_sample_tokens`: length of one sample of a text row (None = the whole row is one
    sample, the upper bound of its attention work).
    """

    media_fraction: Mapping[str, float] = field(
        default_factory=lambda: {"image": 0.75, "video": 0.85, "audio": 0.5})
    audio_seconds: float = 30.0
    text_sample_tokens: Optional[int] = None
    source: str = "assumed"  # or what they were measured on (planner/media_stats.py)

    def __post_init__(self):
        for m, f in self.media_fraction.items():
            if m not in MEDIA_ENCODER:
                raise ConfigError(f"media fraction for {m!r}: only {sorted(MEDIA_ENCODER)} carry media")
            if not 0.0 <= f <= 1.0:
                raise ConfigError(f"media fraction of {m} must lie in [0, 1], got {f}")
        if self.audio_seconds <= 0:
            raise ConfigError(f"audio_seconds must be > 0, got {self.audio_seconds}")
        if self.text_sample_tokens is not None and self.text_sample_tokens < 1:
            raise ConfigError(f"text_sample_tokens must be >= 1, got {self.text_sample_tokens}")


@dataclass(frozen=True)
class EncoderParams:
    """Parameters of one encoder module held by one GPU of the first stage at TP=1, split into
    the tensor-parallel ones (divided by TP) and the replicated ones (LayerNorms, biases of
    row-parallel layers, and the whole SAN-M encoder, which is not tensor-split)."""

    tp_split: int
    replicated: int

    def per_gpu(self, tp: int) -> int:
        return self.tp_split // tp + self.replicated


@dataclass(frozen=True)
class RowMedia:
    """Encoder work of one packed row of one modality: forward FLOPs per module and the
    activation bytes one TP rank keeps for the backward (before deciding if it is needed)."""

    forward_flops: Mapping[str, float]
    activation_replicated: Mapping[str, float]  # bytes every TP rank keeps whole
    activation_tp_split: Mapping[str, float]  # bytes divided over the TP ranks

    def activation_bytes(self, module: str, tp: int) -> float:
        return self.activation_replicated.get(module, 0.0) + self.activation_tp_split.get(module, 0.0) / tp


@dataclass(frozen=True)
class OmniWorkload:
    omni: OmniConfig
    balance: SchedulerConfig
    max_image_tokens: int
    max_video_frames: Optional[int]
    lora_fraction: Optional[float] = None
    max_video_tokens: Optional[int] = None  # one clip's LLM tokens; None = max_image_tokens (the loader's rule)
    preference_rows: bool = False  # the stage has a `dpo:` section (no context parallelism, config/validate.py)
    media: MediaAssumptions = field(default_factory=MediaAssumptions)
    stage: str = ""  # what the workload was read from, for reports
    _rows: Dict[Tuple[str, int, int, int], "RowMedia"] = field(default_factory=dict, compare=False, repr=False)
    _variants: Dict[bool, "OmniWorkload"] = field(default_factory=dict, compare=False, repr=False)

    @property
    def encoder_recompute(self) -> bool:
        """Every encoder of the model recomputes its layers."""
        return all(e.recompute for e in (self.omni.vision, self.omni.audio) if e is not None)

    @property
    def trains_an_encoder(self) -> bool:
        return any(self.keeps_activations(m) for m in ("vision_encoder", "audio_encoder"))

    def with_encoder_recompute(self, recompute: Optional[bool]) -> "OmniWorkload":
        """This workload with `vision.recompute` and `audio.recompute` set (None: as configured)."""
        if recompute is None or recompute == self.encoder_recompute:
            return self
        if recompute not in self._variants:
            omni = dataclasses.replace(self.omni, **{
                k: dataclasses.replace(e, recompute=recompute)
                for k, e in (("vision", self.omni.vision), ("audio", self.omni.audio)) if e is not None})
            self._variants[recompute] = dataclasses.replace(self, omni=omni, _rows={}, _variants={})
        return self._variants[recompute]

    @property
    def modalities(self) -> List[str]:
        return list(self.balance.modalities)

    # ------------------------------------------------------------ what trains
    def trainable(self, module: str) -> bool:
        return module_trains(module, self.omni)

    def passes(self, module: str) -> int:
        """Forward-pass equivalents this module executes per microbatch (module docstring), + 1
        for a recomputed encoder (`vision.recompute`, `audio.recompute`) that runs a backward."""
        base = self._passes(module)
        encoder = {"vision_encoder": self.omni.vision, "audio_encoder": self.omni.audio}.get(module)
        return base + int(base > 1 and encoder is not None and encoder.recompute)

    def _passes(self, module: str) -> int:
        return module_passes(module, self.omni, lora=bool(self.lora_fraction))

    def keeps_activations(self, module: str) -> bool:
        return self._passes(module) > 1

    # ------------------------------------------------------------ microbatch mix
    def modality_shares(self, num_microbatches: int) -> Dict[str, float]:
        """Long-run share of each modality among one DP rank's microbatches, from the scheduler
        itself (raises ValueError when the scheduler rejects this many microbatches)."""
        return _shares(self.balance, num_microbatches)

    # ------------------------------------------------------------ media of one row
    def row_media(self, modality: str, seq_len: int, micro_batch: int = 1, cp: int = 1) -> RowMedia:
        """Encoder work of one microbatch of `modality` (rows of `seq_len` tokens) on the busiest of
        `cp` context-parallel ranks: each encodes a contiguous run of the items
        (`parallel/context_parallel.cp_item_range`); one long clip is not split."""
        key = (modality, seq_len, micro_batch, cp)
        if key not in self._rows:
            self._rows[key] = self._row_media(modality, seq_len, micro_batch, cp)
        return self._rows[key]

    def model_flops_per_microbatch(self, seq_len: int, micro_batch: int, num_microbatches: int) -> float:
        """Encoder + connector model FLOPs of an average microbatch, counted as the training
        logs count them (`training/encoder_flops.py`: recomputation left out)."""
        return sum(share * self._passes(module) * flops
                   for m, share in self.modality_shares(num_microbatches).items()
                   for module, flops in self.row_media(m, seq_len, micro_batch).forward_flops.items())

    def media_items(self, modality: str, seq_len: int) -> int:
        """Media items (images, clips) in one packed row of `modality`; 0 for rows without media."""
        tokens = int(self.media.media_fraction.get(modality, 0.0) * seq_len)
        encoder = MEDIA_ENCODER.get(modality)
        if encoder == "vision" and self.omni.vision is not None and tokens:
            return max(1, tokens // _vision_tokens(self._vision_grid(modality), self.omni.vision))
        if encoder == "audio" and self.omni.audio is not None and tokens:
            return max(1, tokens // int(audio_token_count(self._audio_frames, self.omni.audio)))
        return 0

    def row_segments(self, modality: str, seq_len: int) -> List[int]:
        """Sample lengths of one packed row of `modality` (module docstring): a media row holds one
        sample per media item, the row split evenly among them; a text row samples of
        `text_sample_tokens` (the last one shorter), or the whole row."""
        items = self.media_items(modality, seq_len)
        if items:
            return [seq_len // items + (1 if i < seq_len % items else 0) for i in range(items)]
        sample = min(self.media.text_sample_tokens or seq_len, seq_len)
        return [sample] * (seq_len // sample) + ([seq_len % sample] if seq_len % sample else [])

    def row_segment_mix(self, seq_len: int, num_microbatches: int) -> List[Tuple[float, List[int]]]:
        """(share of the microbatches, sample lengths of one row) per modality of the step."""
        return [(share, self.row_segments(m, seq_len)) for m, share in self.modality_shares(num_microbatches).items()]

    @property
    def _audio_frames(self) -> int:
        return int(self.media.audio_seconds * FBANK_FRAMES_PER_S)

    def _row_media(self, modality: str, seq_len: int, micro_batch: int, cp: int) -> RowMedia:
        from megatron_omni.parallel.context_parallel import cp_item_range

        items = self.media_items(modality, seq_len) * micro_batch
        if cp > 1 and items:  # the trainer's own split of equal items: the busiest rank's share
            items = max(hi - lo for lo, hi in (cp_item_range([1] * items, cp, r) for r in range(cp)))
        encoder = MEDIA_ENCODER.get(modality)
        if encoder == "vision" and items:
            return _vision_row(self.omni.vision, self._vision_grid(modality), items)
        if encoder == "audio" and items:
            return _audio_row(self.omni.audio, self._audio_frames, items)
        return RowMedia({}, {}, {})

    def _vision_grid(self, modality: str) -> Tuple[int, int, int]:
        """(t, h, w) patch grid of one image / video at the stage's Table 2 limit."""
        vision = self.omni.vision
        m = vision.spatial_merge_size
        if modality == "video":
            frames = self.max_video_frames or vision.temporal_patch_size
            t = max(1, frames // vision.temporal_patch_size)
            # the clip shares its token budget over its temporal groups (data/media/geometry.plan_video)
            per_slice = max(1, (self.max_video_tokens or self.max_image_tokens) // t)
        else:
            t, per_slice = 1, self.max_image_tokens
        side = max(1, math.isqrt(per_slice))
        return t, side * m, (per_slice // side) * m

    def describe(self) -> Dict:
        return {
            "stage": self.stage, "modalities": self.modalities, "scheduler_mode": self.balance.mode,
            "pure_text_share": self.balance.pure_text_share, "freeze": list(self.omni.freeze),
            "lora_fraction": self.lora_fraction, "max_image_tokens": self.max_image_tokens,
            "max_video_frames": self.max_video_frames, "max_video_tokens": self.max_video_tokens,
            "media_fraction": dict(self.media.media_fraction), "audio_seconds": self.media.audio_seconds,
            "text_sample_tokens": self.media.text_sample_tokens,
            "media_source": self.media.source,
        }


def _vision_tokens(grid: Tuple[int, int, int], vision: VisionConfig) -> int:
    t, h, w = grid
    return t * h * w // vision.spatial_merge_size ** 2


def _vision_row(vision: VisionConfig, grid: Tuple[int, int, int], items: int) -> RowMedia:
    grids = torch.tensor([grid] * items)
    flops = vision_forward_flops_by_module(vision, grids)
    patches = items * grid[0] * grid[1] * grid[2]
    d, f = vision.hidden_size, vision.ffn_hidden_size
    # Per patch and layer (bf16, flash attention, no sequence parallelism inside the encoder):
    # replicated: both LayerNorm inputs, the QKV and fc1 GEMM inputs (8d); TP-split: Q, K, V and
    # the attention output (8d), the activation input and the fc2 GEMM input (4f).  With
    # `recompute` only each block's input (2d) stays, plus one block's working set at a time.
    # Merger, per patch: LayerNorm + fc1 inputs (4d, replicated), GELU + fc2 inputs (m/4 wide
    # each per patch, split).
    m = vision.merge_width // vision.spatial_merge_size ** 2
    layers_kept, inputs = (1, vision.depth * 2 * d) if vision.recompute else (vision.depth, 0)
    return RowMedia(
        flops,
        {"vision_encoder": patches * (inputs + layers_kept * 8 * d), "vision_connector": patches * 4 * d},
        {"vision_encoder": patches * layers_kept * (8 * d + 4 * f), "vision_connector": patches * 4 * m},
    )


def _audio_row(audio: AudioConfig, frames: int, items: int) -> RowMedia:
    flops = audio_forward_flops_by_module(audio, torch.full((items,), frames))
    enc = int(encoder_frame_count(frames, audio))
    tokens = items * int(audio_token_count(frames, audio))
    d, f, layers = audio.d_model, audio.ffn_hidden_size, audio.num_layers
    hidden = audio.connector_hidden_size or audio.out_hidden_size
    # Connector, per token: the stacked k frames (GEMM input, replicated), GELU + fc2 inputs (split).
    connector = ({"audio_connector": tokens * 2 * audio.downsample_factor * d},
                 {"audio_connector": tokens * 4 * hidden})
    # With `recompute` each layer keeps only its input (2d per frame), plus one layer's working
    # set at a time.
    layers_kept, inputs = (1, layers * 2 * d) if audio.recompute else (layers, 0)
    if audio.encoder_type == "sanm":
        # Plain torch modules, replicated over TP: LayerNorm/QKV/FFN inputs, Q, K, V, attention
        # output, FSMN memory (16d) + the FFN's 4f, and the softmax probabilities it
        # materialises (heads x frames^2 per clip, bf16).
        per_clip = enc * inputs + layers_kept * (enc * (16 * d + 4 * f) + 2 * audio.num_attention_heads * enc * enc)
        return RowMedia(flops, {"audio_encoder": items * per_clip, **connector[0]}, connector[1])
    # Whisper-style: megatron blocks, split as the ViT's.
    return RowMedia(flops, {"audio_encoder": items * enc * (inputs + layers_kept * 8 * d), **connector[0]},
                    {"audio_encoder": items * enc * layers_kept * (8 * d + 4 * f), **connector[1]})


@lru_cache(maxsize=64)
def _shares_cached(balance_key: str, num_microbatches: int) -> Tuple[Tuple[str, float], ...]:
    import json

    cfg = SchedulerConfig(**json.loads(balance_key))
    scheduler = ModalityRoundScheduler(cfg, num_microbatches, seed=0)
    # Text counts repeat with period (share * n).denominator; the rotation of the other
    # modalities with their count: a few periods give the exact long-run mix.
    steps = max(1, _period(cfg, num_microbatches)) * max(1, len(cfg.modalities))
    counts: Dict[str, int] = {m: 0 for m in cfg.modalities}
    for s in range(steps):
        for m, c in scheduler.plan(s).counts().items():
            counts[m] += c
    total = sum(counts.values())
    return tuple((m, c / total) for m, c in counts.items())


def _period(cfg: SchedulerConfig, num_microbatches: int) -> int:
    share = cfg.text_share
    return 1 if share is None else (share * num_microbatches).denominator


def _shares(balance: SchedulerConfig, num_microbatches: int) -> Dict[str, float]:
    import json

    key = {k: v for k, v in dataclasses.asdict(balance).items() if k in ("mode", "modalities", "pure_text_share",
                                                                         "data_volumes")}
    return dict(_shares_cached(json.dumps(key, sort_keys=True), num_microbatches))


# ---------------------------------------------------------------- parameters


def encoder_params(omni: OmniConfig) -> Dict[str, EncoderParams]:
    """Exact parameter counts of the encoders and connectors, built as training builds them
    (megatron modules, on the meta device); TP-split = parameters megatron marks
    `tensor_model_parallel`."""
    import json

    from megatron_omni.config.loader import to_dict

    return dict(_encoder_params_cached(json.dumps(to_dict(omni), sort_keys=True)))


@lru_cache(maxsize=8)
def _encoder_params_cached(omni_key: str) -> Tuple[Tuple[str, EncoderParams], ...]:
    import json

    from megatron_omni.config.loader import from_dict
    from megatron_omni.convert.mcore_io import MetaDevice, megatron_world
    from megatron_omni.models.omni import module_of

    omni = from_dict(OmniConfig, json.loads(omni_key))
    split: Dict[str, int] = {m: 0 for m in ENCODER_MODULES}
    replicated: Dict[str, int] = {m: 0 for m in ENCODER_MODULES}
    with megatron_world(), MetaDevice():
        modules = []
        if omni.vision is not None:
            from megatron_omni.models.vision.encoder import NaViTEncoder

            modules.append(("vision.", NaViTEncoder(omni.vision, params_dtype=torch.bfloat16)))
        if omni.audio is not None:
            from megatron_omni.models.audio.whisper import build_audio_encoder

            modules.append(("audio.", build_audio_encoder(omni.audio, params_dtype=torch.bfloat16)))
        for prefix, module in modules:
            for name, p in module.named_parameters():
                target = split if getattr(p, "tensor_model_parallel", False) else replicated
                target[module_of(prefix + name)] += p.numel()
    return tuple((m, EncoderParams(split[m], replicated[m])) for m in ENCODER_MODULES)


# ---------------------------------------------------------------- from a config


def workload_from_config(cfg: RunConfig, media: Optional[MediaAssumptions] = None,
                         source: str = "") -> OmniWorkload:
    """The omni workload of a run config (a stage config) or a model bundle (`model` + `omni`).

    A stage names its blend (`data.omni_blend`): its Table 2 media limits and modalities.
    Without one (a model bundle) the plan assumes PT-3's: every modality the encoders serve,
    320 image tokens, 8 video frames (Table 2), 25 % pure text (Sec. 3.3).
    """
    from megatron_omni.data.blend import BlendConfig, load_blend

    if cfg.omni is None:
        raise ConfigError("not an omni config (no `omni:` section)")
    blend: Optional[BlendConfig] = None
    if cfg.data.omni_blend:
        path = cfg.data.omni_blend
        if not os.path.exists(path):
            raise ConfigError(f"data.omni_blend {path!r} not found (paths are relative to the directory "
                              f"plan.py runs in, as for training)")
        blend = load_blend(path)
    if blend is not None:
        modalities = list(blend.modalities)
        limits = (blend.max_image_tokens, blend.max_video_frames, blend.pure_text_share, blend.max_video_tokens)
    else:
        modalities = ([m for m in ("image", "video") if cfg.omni.vision is not None]
                      + (["audio"] if cfg.omni.audio is not None else []) + [TEXT])
        limits = (320, 8 if cfg.omni.vision is not None else None, 0.25, None)
    balance = cfg.balance
    if balance is None:  # the loop's default plan (training/omni_data.py)
        balance = SchedulerConfig(mode="accumulation", modalities=modalities,
                                  pure_text_share=limits[2] if TEXT in modalities else None)
    return OmniWorkload(
        omni=cfg.omni, balance=balance, max_image_tokens=limits[0], max_video_frames=limits[1],
        max_video_tokens=limits[3], preference_rows=cfg.dpo is not None,
        lora_fraction=cfg.lora.fraction if cfg.lora is not None else None,
        media=media or MediaAssumptions(), stage=source or (blend.stage if blend else "model bundle"),
    )
