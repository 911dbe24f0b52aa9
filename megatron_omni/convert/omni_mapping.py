"""Declarative name tables: our omni encoders <-> Qwen2-VL vision tower, HF Whisper encoder, FunASR SAN-M.

One table per source family, used by both directions (`omni_import.py`: HF -> megatron;
the omni export: megatron -> HF).  A table is a list of `EncoderRule`s; `table.bindings()`
expands it over the layers into concrete (source names <-> our checkpoint key, layer) pairs.

Names:
  * source names are relative to the encoder (the vision tower, `WhisperEncoder`, FunASR's
    `encoder`): `blocks.0.attn.qkv.weight`, `layers.0.fc1.weight`, `encoders0.0.norm1.weight`.
    Where the tower sits inside a folder (`visual.`, `model.visual.`, `model.encoder.`, `encoder.`)
    is the caller's business (`EncoderTable.source_prefixes` lists the accepted ones on import).
  * our names are megatron *checkpoint* names of `OmniModel` (with the `vision.` / `audio.` prefix).
    For megatron TransformerBlocks (ViT, Whisper-style) the stored key drops `{layer}.` and stacks
    the layers on a prepended axis (`stacked=True`), and norms use Transformer-Engine names
    (`self_attention.linear_qkv.layer_norm_weight`) whichever kernels built the model.  SAN-M is
    plain torch: one key per layer (`audio.layers.3.norm1.weight`), `stacked=False`.

Transforms are exact rearrangements (bit-preserving in both directions).  Tensors no source has
(the audio connector; CMVN when the source has none) are `EncoderTable.unsourced` (prefixes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from megatron_omni.config.encoders import AudioConfig, VisionConfig
from megatron_omni.models.audio.hf_whisper import fuse_qkv
from megatron_omni.models.vision.hf_weights import qkv_hf_to_megatron, qkv_megatron_to_hf

Shape = Tuple[int, ...]

# The LLM: convert/llama.py's LLAMA table.  Its two vocabulary tensors have the *omni* vocabulary in
# our checkpoint (text rows, then models/omni_vocab.py's special tokens and audio codes, then TP
# padding); on import the rows past the HF vocabulary are initialised (see omni_import.py).
OMNI_VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


# --------------------------------------------------------------------------------------
# Transforms (one layer's tensors)


class EncoderTransform:
    """Source tensors (in rule order) <-> one of our tensors."""

    name = "copy"
    arity = 1

    def to_ours(self, src: Sequence[Tensor]) -> Tensor:
        return src[0]

    def to_source(self, ours: Tensor) -> List[Tensor]:
        return [ours]

    def source_shapes(self, ours: Shape) -> List[Shape]:
        return [tuple(ours)]


class HeadInterleave(EncoderTransform):
    """Qwen2-VL fused `attn.qkv` [q; k; v] (weight or bias) <-> megatron per-head [q_h; k_h; v_h]."""

    name = "head_interleave"

    def __init__(self, heads: int):
        self.heads = heads

    def to_ours(self, src):
        return qkv_hf_to_megatron(src[0], self.heads)

    def to_source(self, ours):
        return [qkv_megatron_to_hf(ours, self.heads)]


class FuseQKV(EncoderTransform):
    """Whisper q_proj, k_proj, v_proj [d, d] <-> megatron's fused per-head linear_qkv [3d, d]."""

    name = "fuse_qkv"
    arity = 3

    def __init__(self, heads: int):
        self.heads = heads

    def to_ours(self, src):
        return fuse_qkv(*src, self.heads)

    def to_source(self, ours):
        parts = ours.reshape(self.heads, 3, -1, *ours.shape[1:]).unbind(1)
        return [p.reshape(ours.shape[0] // 3, *ours.shape[1:]) for p in parts]

    def source_shapes(self, ours):
        return [(ours[0] // 3,) + tuple(ours[1:])] * 3


class FuseQVBias(FuseQKV):
    """Whisper q_proj.bias, v_proj.bias (k_proj has none) <-> the fused bias with a zero key part
    (WhisperStyleEncoder keeps it zero; on export it is dropped)."""

    name = "fuse_qv_bias"
    arity = 2

    def to_ours(self, src):
        q, v = src
        return fuse_qkv(q, torch.zeros_like(q), v, self.heads)

    def to_source(self, ours):
        q, _, v = super().to_source(ours)
        return [q, v]

    def source_shapes(self, ours):
        return super().source_shapes(ours)[:2]


COPY = EncoderTransform()


# --------------------------------------------------------------------------------------
# Tables


@dataclass(frozen=True)
class EncoderRule:
    """Source name(s) <-> one of our checkpoint tensors.  Patterns may hold `{layer}` (our layer
    index) and `{prev}` (= layer - 1); `layers` selects which of our layers the rule covers:
    "all", "first" (layer 0 only) or "rest" (layers 1..)."""

    source: Tuple[str, ...]
    ours: str
    transform: EncoderTransform = COPY
    layers: str = "all"

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.ours


@dataclass(frozen=True)
class EncoderBinding:
    """One rule at one layer.  `key`/`index`: our checkpoint key and, for stacked keys, the layer's
    index on its first axis (None: the key is the whole tensor)."""

    rule: EncoderRule
    layer: Optional[int]
    source: Tuple[str, ...]
    key: str
    index: Optional[int]

    def to_ours(self, src: Sequence[Tensor]) -> Tensor:
        return self.rule.transform.to_ours(src)

    def to_source(self, ours: Tensor) -> List[Tensor]:
        return self.rule.transform.to_source(ours)

    def source_shapes(self, ours: Shape) -> List[Shape]:
        return self.rule.transform.source_shapes(ours)


@dataclass(frozen=True)
class EncoderTable:
    name: str  # qwen2_vl | whisper | funasr_sanm
    prefix: str  # our module prefix: "vision." | "audio."
    num_layers: int
    stacked: bool
    rules: Tuple[EncoderRule, ...]
    # Source names (after the prefix) accepted and not converted, as regexes with the reason.
    drops: Tuple[Tuple[str, str], ...] = ()
    # Prefixes of our tensors that no source tensor provides (initialised on import, not exported).
    unsourced: Tuple[str, ...] = ()
    # Where the encoder sits in the source files (tried in order on import).
    source_prefixes: Tuple[str, ...] = ("",)

    def bindings(self) -> List[EncoderBinding]:
        out: List[EncoderBinding] = []
        for rule in self.rules:
            if not rule.per_layer:
                out.append(EncoderBinding(rule, None, rule.source, rule.ours, None))
                continue
            for layer in range(self.num_layers):
                if (rule.layers == "first" and layer) or (rule.layers == "rest" and not layer):
                    continue
                fmt = {"layer": layer, "prev": layer - 1}
                key = rule.ours.replace("{layer}.", "") if self.stacked else rule.ours.format(**fmt)
                out.append(EncoderBinding(rule, layer, tuple(p.format(**fmt) for p in rule.source), key,
                                          layer if self.stacked else None))
        return out

    def drop_reason(self, source_name: str) -> Optional[str]:
        for pattern, reason in self.drops:
            if re.fullmatch(pattern, source_name):
                return reason
        return None

    def is_unsourced(self, key: str) -> bool:
        return key.startswith(self.unsourced)


# ---- Qwen2-VL vision tower (Qwen2VisionTransformerPretrainedModel) -> NaViTEncoder

_VIT_LAYER = (  # (HF block-local name, our layer-local checkpoint name, head-interleaved?)
    ("norm1.weight", "self_attention.linear_qkv.layer_norm_weight", False),
    ("norm1.bias", "self_attention.linear_qkv.layer_norm_bias", False),
    ("attn.qkv.weight", "self_attention.linear_qkv.weight", True),
    ("attn.qkv.bias", "self_attention.linear_qkv.bias", True),
    ("attn.proj.weight", "self_attention.linear_proj.weight", False),
    ("attn.proj.bias", "self_attention.linear_proj.bias", False),
    ("norm2.weight", "mlp.linear_fc1.layer_norm_weight", False),
    ("norm2.bias", "mlp.linear_fc1.layer_norm_bias", False),
    ("mlp.fc1.weight", "mlp.linear_fc1.weight", False),
    ("mlp.fc1.bias", "mlp.linear_fc1.bias", False),
    ("mlp.fc2.weight", "mlp.linear_fc2.weight", False),
    ("mlp.fc2.bias", "mlp.linear_fc2.bias", False),
)
_VIT_TOP = (
    ("patch_embed.proj.weight", "patch_embed.weight"),
    ("merger.ln_q.weight", "merger.layernorm.weight"),
    ("merger.ln_q.bias", "merger.layernorm.bias"),
    ("merger.mlp.0.weight", "merger.linear_fc1.weight"),
    ("merger.mlp.0.bias", "merger.linear_fc1.bias"),
    ("merger.mlp.2.weight", "merger.linear_fc2.weight"),
    ("merger.mlp.2.bias", "merger.linear_fc2.bias"),
)
# The merger's last projection maps to the LLM width: re-initialised when the source's differs.
VISION_OUTPUT_PROJECTION = ("vision.merger.linear_fc2.weight", "vision.merger.linear_fc2.bias")


def vision_table(cfg: VisionConfig) -> EncoderTable:
    qkv = HeadInterleave(cfg.num_attention_heads)
    rules = [EncoderRule((hf,), "vision." + ours) for hf, ours in _VIT_TOP[:1]]
    rules += [EncoderRule((f"blocks.{{layer}}.{hf}",), f"vision.decoder.layers.{{layer}}.{ours}", qkv if inter else COPY)
              for hf, ours, inter in _VIT_LAYER]
    rules += [EncoderRule((hf,), "vision." + ours) for hf, ours in _VIT_TOP[1:]]
    return EncoderTable(
        name="qwen2_vl", prefix="vision.", num_layers=cfg.depth, stacked=True, rules=tuple(rules),
        source_prefixes=("visual.", "model.visual.", ""))


# ---- HF WhisperEncoder -> WhisperStyleEncoder

_WHISPER_LAYER = (
    ("self_attn_layer_norm", "self_attention.linear_qkv.layer_norm_"),
    ("self_attn.out_proj", "self_attention.linear_proj."),
    ("final_layer_norm", "mlp.linear_fc1.layer_norm_"),
    ("fc1", "mlp.linear_fc1."),
    ("fc2", "mlp.linear_fc2."),
)


def whisper_table(cfg: AudioConfig) -> EncoderTable:
    L, D = "layers.{layer}.", "audio.decoder.layers.{layer}."
    heads = cfg.num_attention_heads
    rules = [EncoderRule((f"{c}.{p}",), f"audio.{c}.{p}") for c in ("conv1", "conv2") for p in ("weight", "bias")]
    rules.append(EncoderRule(("embed_positions.weight",), "audio.position_embedding"))
    rules.append(EncoderRule(tuple(f"{L}self_attn.{n}_proj.weight" for n in "qkv"),
                             D + "self_attention.linear_qkv.weight", FuseQKV(heads)))
    rules.append(EncoderRule((f"{L}self_attn.q_proj.bias", f"{L}self_attn.v_proj.bias"),
                             D + "self_attention.linear_qkv.bias", FuseQVBias(heads)))
    for hf, ours in _WHISPER_LAYER:
        for p in ("weight", "bias"):
            rules.append(EncoderRule((f"{L}{hf}.{p}",), f"{D}{ours}{p}"))
    rules += [EncoderRule((f"layer_norm.{p}",), f"audio.decoder.final_layernorm.{p}") for p in ("weight", "bias")]
    return EncoderTable(
        name="whisper", prefix="audio.", num_layers=cfg.num_layers, stacked=True, rules=tuple(rules),
        unsourced=("audio.connector.",), source_prefixes=("model.encoder.", "encoder."))


# Whisper(Model|ForConditionalGeneration) tensors outside the encoder (names as in the folder).
WHISPER_FOLDER_DROPS = ((r"(model\.)?decoder\..*", "Whisper text decoder (only the encoder is used)"),
                        (r"proj_out\.weight", "Whisper output projection (decoder side)"))


# ---- FunASR SANMEncoder (Paraformer / paraformer-zh model.pt, under `encoder.`) -> SANMEncoder

_SANM_LAYER = (
    ("norm1", "norm1"), ("self_attn.linear_q_k_v", "self_attn.linear_qkv"),
    ("self_attn.linear_out", "self_attn.linear_out"), ("norm2", "norm2"),
    ("feed_forward.w_1", "ffn.0"), ("feed_forward.w_2", "ffn.3"),
)


def funasr_sanm_table(cfg: AudioConfig) -> EncoderTable:
    rules: List[EncoderRule] = []
    for first, src in ((True, "encoders0.0."), (False, "encoders.{prev}.")):
        which = "first" if first else "rest"
        for hf, ours in _SANM_LAYER:
            for p in ("weight", "bias"):
                rules.append(EncoderRule((f"{src}{hf}.{p}",), f"audio.layers.{{layer}}.{ours}.{p}", layers=which))
        rules.append(EncoderRule((f"{src}self_attn.fsmn_block.weight",), "audio.layers.{layer}.self_attn.fsmn.weight",
                                 layers=which))
    rules += [EncoderRule((f"after_norm.{p}",), f"audio.final_layernorm.{p}") for p in ("weight", "bias")]
    # CMVN (am.mvn, applied after LFR): read from the folder's am.mvn, not from model.pt.
    return EncoderTable(
        name="funasr_sanm", prefix="audio.", num_layers=cfg.num_layers, stacked=False, rules=tuple(rules),
        unsourced=("audio.connector.", "audio.cmvn."), source_prefixes=("encoder.",))


SANM_CMVN_KEYS = ("audio.cmvn.shift", "audio.cmvn.scale")  # (x + shift) * scale, FunASR's apply_cmvn

# FunASR Paraformer model.pt tensors outside the encoder.
FUNASR_FOLDER_DROPS = ((r"decoder\..*", "Paraformer decoder (only the encoder is used)"),
                       (r"predictor\..*", "Paraformer CIF predictor"),
                       (r"ctc\..*", "CTC head"),
                       (r"criterion_att\..*|criterion_pre\..*", "loss buffers"))


def audio_table(cfg: AudioConfig) -> EncoderTable:
    """Our audio encoder's table: Whisper names for encoder_type whisper, FunASR names for sanm."""
    return whisper_table(cfg) if cfg.encoder_type == "whisper" else funasr_sanm_table(cfg)
