"""Pretrained encoder folders as conversion sources: a Qwen2-VL vision tower, an HF Whisper encoder, a
FunASR Paraformer / SAN-M encoder.  Each is opened from headers / configs only (no tensor data),
its config translated into our `VisionConfig` / `AudioConfig`, and every tensor it holds is either
consumed by the encoder's table (omni_mapping.py) or declared dropped with a reason.

All problems of one folder are collected and raised together (ConversionError).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import yaml

from megatron_omni.convert.errors import ConversionError, ProblemList
from megatron_omni.convert.hf_folder import open_hf_folder
from megatron_omni.convert.omni_mapping import (
    FUNASR_FOLDER_DROPS,
    SANM_CMVN_KEYS,
    WHISPER_FOLDER_DROPS,
    EncoderTable,
    funasr_sanm_table,
    vision_table,
    whisper_table,
)
from megatron_omni.config.encoders import AudioConfig, VisionConfig

Shape = Tuple[int, ...]


@dataclass
class EncoderSource:
    """One opened encoder folder.  `tensors`: every tensor of the folder (name -> (shape, dtype));
    `read(name, dtype)` reads one.  `drops`: folder tensors not converted, with the reason.
    `extra`: our tensors that come from non-tensor files (FunASR's am.mvn CMVN)."""

    role: str  # vision | audio
    kind: str  # qwen2_vl | whisper | funasr_sanm
    path: str
    config: object  # VisionConfig | AudioConfig
    table: EncoderTable
    prefix: str  # where the encoder's tensors sit in the folder's names
    tensors: Dict[str, Tuple[Shape, torch.dtype]]
    read: Callable[[str, Optional[torch.dtype]], torch.Tensor]
    drops: Dict[str, str] = field(default_factory=dict)
    extra: Dict[str, torch.Tensor] = field(default_factory=dict)
    source_out_width: Optional[int] = None  # vision: the source merger's output width
    keep_files: Tuple[str, ...] = ()  # config / preprocessing files copied to OUT/hf_source/<role>/
    close: Callable[[], None] = lambda: None

    def source_name(self, name: str) -> str:
        return self.prefix + name


def _hf_tensors(folder) -> Dict[str, Tuple[Shape, torch.dtype]]:
    return {n: (tuple(i.shape), i.dtype) for n, i in folder.tensors.items()}


def _encoder_prefix(table: EncoderTable, tensors, first: str) -> Optional[str]:
    return next((p for p in table.source_prefixes if p + first in tensors), None)


def _classify(source: EncoderSource, folder_drops, problems: ProblemList) -> None:
    """Every tensor outside the encoder's table is dropped by a folder rule or is a problem."""
    wanted = {source.prefix + n for b in source.table.bindings() for n in b.source}
    for name in sorted(source.tensors):
        if name in wanted:
            continue
        reason = None
        if name.startswith(source.prefix):
            reason = source.table.drop_reason(name[len(source.prefix):])
        if reason is None:
            reason = next((r for pat, r in folder_drops if re.fullmatch(pat, name)), None)
        if reason is None:
            problems.add("source tensors not consumed", f"{source.role} {name} {list(source.tensors[name][0])}")
        else:
            source.drops[name] = reason


# --------------------------------------------------------------------------------------
# Qwen2-VL vision tower


def vision_config_from_hf(cfg: Dict, llm_width: int, problems: List[str]) -> Tuple[Optional[VisionConfig], int]:
    """Qwen2VLVisionConfig dict -> (VisionConfig with out_hidden_size = the LLM width, source merger width)."""
    model_type = cfg.get("model_type", "")
    if model_type.startswith("qwen2_5") or "window_size" in cfg or "fullatt_block_indexes" in cfg:
        problems.append(f"model_type={model_type!r}: a Qwen2.5-VL vision tower (window attention, RMSNorm, gated "
                        "SwiGLU MLP) is not supported; use a Qwen2-VL vision tower (e.g. Qwen2-VL-7B-Instruct)")
        return None, 0
    missing = [k for k in ("depth", "embed_dim", "num_heads") if k not in cfg]
    if missing:
        problems.append(f"vision config misses {missing}")
        return None, 0
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        problems.append(f"vision hidden_act={act!r}: supported are quick_gelu and gelu")
        return None, 0
    rope = cfg.get("rope_parameters") or {}
    embed = int(cfg["embed_dim"])
    try:
        vc = VisionConfig(
            depth=int(cfg["depth"]), hidden_size=embed, num_attention_heads=int(cfg["num_heads"]),
            ffn_hidden_size=int(embed * cfg.get("mlp_ratio", 4)), patch_size=int(cfg.get("patch_size", 14)),
            temporal_patch_size=int(cfg.get("temporal_patch_size", 2)),
            in_channels=int(cfg.get("in_channels", cfg.get("in_chans", 3))),
            spatial_merge_size=int(cfg.get("spatial_merge_size", 2)), out_hidden_size=llm_width,
            norm_epsilon=1e-6, activation=act, rotary_base=float(rope.get("rope_theta", 10000.0)),
            init_method_std=float(cfg.get("initializer_range", 0.02)))
    except ValueError as e:
        problems.append(f"vision config: {e}")
        return None, 0
    return vc, int(cfg.get("hidden_size", llm_width))


def open_vision(path: str, llm_width: int) -> EncoderSource:
    """A whole Qwen2VLForConditionalGeneration folder (vision_config; tensors under visual. / model.visual.,
    the language model dropped) or a standalone vision-tower folder (Qwen2VLVisionConfig at the top)."""
    problems = ProblemList(f"--vision {path}")
    folder = open_hf_folder(path)
    cfg = folder.config
    whole = "vision_config" in cfg
    errors: List[str] = []
    if whole and str(cfg.get("model_type", "")).startswith("qwen2_5"):
        errors.append(f"model_type={cfg.get('model_type')!r}: Qwen2.5-VL (window attention in the vision tower) is "
                      "not supported; use a Qwen2-VL model")
    vc, width = vision_config_from_hf(cfg["vision_config"] if whole else cfg, llm_width, errors)
    if errors or vc is None:
        raise ConversionError(f"--vision {path}", {"unsupported config": errors or ["no vision config"]})
    table = vision_table(vc)
    tensors = _hf_tensors(folder)
    prefix = _encoder_prefix(table, tensors, "patch_embed.proj.weight")
    if prefix is None or (whole and prefix == ""):
        raise ConversionError(f"--vision {path}", {"target tensors not written": [
            "no vision tower tensors (looked for visual.patch_embed.proj.weight, model.visual.patch_embed.proj.weight"
            + ("" if whole else ", patch_embed.proj.weight") + "); is this a Qwen2-VL folder?"]})
    source = EncoderSource("vision", "qwen2_vl", path, vc, table, prefix, tensors, folder.read, source_out_width=width,
                           keep_files=("config.json", "preprocessor_config.json"), close=folder.close)
    lm = ((r"(model\.language_model\.|model\.(?!visual\.)|lm_head\.).*",
           "Qwen2-VL language model (the LLM comes from --llm)"),) if whole else ()
    _classify(source, lm, problems)
    problems.raise_if_any()
    return source


# --------------------------------------------------------------------------------------
# HF Whisper


def whisper_config_from_hf(cfg: Dict, llm_width: int, downsample: int, problems: List[str]) -> Optional[AudioConfig]:
    missing = [k for k in ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim") if k not in cfg]
    if missing:
        problems.append(f"Whisper config misses {missing}")
        return None
    if cfg.get("activation_function", "gelu") != "gelu":
        problems.append(f"activation_function={cfg.get('activation_function')!r}: the encoder uses exact GELU")
    if cfg.get("scale_embedding"):
        problems.append("scale_embedding=true: the encoder input is not scaled by sqrt(d_model) here")
    if problems:
        return None
    try:
        ac = AudioConfig(
            encoder_type="whisper", num_mel_bins=int(cfg.get("num_mel_bins", 80)), d_model=int(cfg["d_model"]),
            num_layers=int(cfg["encoder_layers"]), num_attention_heads=int(cfg["encoder_attention_heads"]),
            ffn_hidden_size=int(cfg["encoder_ffn_dim"]),
            max_source_positions=int(cfg.get("max_source_positions", 1500)), position_embedding="sinusoidal",
            layernorm_epsilon=1e-5, init_method_std=float(cfg.get("init_std", 0.02)), downsample_factor=downsample,
            out_hidden_size=llm_width)
    except ValueError as e:
        problems.append(f"Whisper config: {e}")
        return None
    return ac


def open_whisper(path: str, llm_width: int, downsample: int) -> EncoderSource:
    folder = open_hf_folder(path)
    errors: List[str] = []
    ac = whisper_config_from_hf(folder.config, llm_width, downsample, errors)
    if ac is None:
        raise ConversionError(f"--audio {path}", {"unsupported config": errors})
    table = whisper_table(ac)
    tensors = _hf_tensors(folder)
    prefix = _encoder_prefix(table, tensors, "conv1.weight")
    if prefix is None:
        raise ConversionError(f"--audio {path}", {"target tensors not written": [
            "no Whisper encoder tensors (looked for model.encoder.conv1.weight, encoder.conv1.weight)"]})
    source = EncoderSource("audio", "whisper", path, ac, table, prefix, tensors, folder.read,
                           keep_files=("config.json", "preprocessor_config.json"), close=folder.close)
    problems = ProblemList(f"--audio {path}")
    _classify(source, WHISPER_FOLDER_DROPS, problems)
    problems.raise_if_any()
    return source


# --------------------------------------------------------------------------------------
# FunASR Paraformer / SAN-M (model.pt + config.yaml + am.mvn)


def load_am_mvn(path: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Kaldi nnet-text CMVN (FunASR's am.mvn): the <AddShift> and <Rescale> rows -> (shift, scale)."""
    rows: Dict[str, List[float]] = {}
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines[:-1]):
        head = line.split()[:1]
        if head and head[0] in ("<AddShift>", "<Rescale>"):
            nxt = lines[i + 1].split()
            if nxt[:1] != ["<LearnRateCoef>"] or "[" not in nxt or nxt[-1] != "]":
                raise ValueError(f"{path}: line {i + 2}: expected '<LearnRateCoef> c [ values ]' after {head[0]}")
            rows[head[0]] = [float(v) for v in nxt[nxt.index("[") + 1:-1]]
    if set(rows) != {"<AddShift>", "<Rescale>"} or len(rows["<AddShift>"]) != len(rows["<Rescale>"]):
        raise ValueError(f"{path}: expected one <AddShift> and one <Rescale> row of equal length, found "
                         f"{ {k: len(v) for k, v in rows.items()} }")
    return torch.tensor(rows["<AddShift>"]), torch.tensor(rows["<Rescale>"])


def sanm_config_from_funasr(cfg: Dict, llm_width: int, downsample: int, problems: List[str]) -> Optional[AudioConfig]:
    enc, front = cfg.get("encoder_conf") or {}, cfg.get("frontend_conf") or {}
    if cfg.get("encoder") not in ("SANMEncoder", "sanm"):
        problems.append(f"encoder={cfg.get('encoder')!r}: only FunASR's SANMEncoder (Paraformer) is supported")
    for key, want in (("normalize_before", True), ("selfattention_layer_type", "sanm"),
                      ("pos_enc_class", "SinusoidalPositionEncoder"), ("input_layer", "pe")):
        if enc.get(key, want) != want:
            problems.append(f"encoder_conf.{key}={enc.get(key)!r}: only {want!r} is supported")
    if enc.get("kernel_size") is None or enc.get("output_size") is None:
        problems.append("encoder_conf needs output_size and kernel_size")
    if problems:
        return None
    try:
        return AudioConfig(
            encoder_type="sanm", num_mel_bins=int(front.get("n_mels", 80)), d_model=int(enc["output_size"]),
            num_layers=int(enc.get("num_blocks", 6)), num_attention_heads=int(enc.get("attention_heads", 4)),
            ffn_hidden_size=int(enc.get("linear_units", 2048)), max_source_positions=3000,
            layernorm_epsilon=1e-12,  # FunASR's LayerNorm
            lfr_m=int(front.get("lfr_m", 1)), lfr_n=int(front.get("lfr_n", 1)), sanm_kernel_size=int(enc["kernel_size"]),
            sanm_shift=int(enc.get("sanm_shfit", enc.get("sanm_shift", 0))), downsample_factor=downsample,
            out_hidden_size=llm_width)
    except ValueError as e:
        problems.append(f"SAN-M config: {e}")
        return None


def open_funasr(path: str, llm_width: int, downsample: int) -> EncoderSource:
    files = {n: os.path.join(path, n) for n in ("model.pt", "config.yaml", "am.mvn")}
    missing = [n for n, p in files.items() if not os.path.isfile(p)]
    if missing:
        raise ConversionError(f"--audio {path}", {"unreadable files": [
            f"{path}: a FunASR Paraformer folder needs model.pt, config.yaml and am.mvn; missing {missing}"]})
    errors: List[str] = []
    try:
        with open(files["config.yaml"]) as f:
            cfg = yaml.safe_load(f) or {}
        state = torch.load(files["model.pt"], map_location="cpu", mmap=True, weights_only=True)
        shift, scale = load_am_mvn(files["am.mvn"])
    except Exception as e:  # noqa: BLE001 - any unreadable file is one listed problem
        raise ConversionError(f"--audio {path}", {"unreadable files": [f"{type(e).__name__}: {e}"]}) from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # FunASR training checkpoints wrap the weights
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"--audio {path}", {"unreadable files": [f"{files['model.pt']}: not a state dict"]})
    ac = sanm_config_from_funasr(cfg, llm_width, downsample, errors)
    if ac is None:
        raise ConversionError(f"--audio {path}", {"unsupported config": errors})
    dim = ac.num_mel_bins * ac.lfr_m
    if shift.numel() != dim:
        raise ConversionError(f"--audio {path}", {"shape mismatches": [
            f"am.mvn has {shift.numel()} values per row; n_mels x lfr_m = {dim}"]})
    table = funasr_sanm_table(ac)
    tensors = {n: (tuple(t.shape), t.dtype) for n, t in state.items()}

    def read(name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        t = state[name]
        return t.to(dtype) if dtype is not None and t.dtype != dtype else t.clone()

    source = EncoderSource("audio", "funasr_sanm", path, ac, table, "encoder.", tensors, read,
                           extra=dict(zip(SANM_CMVN_KEYS, (shift, scale))),
                           keep_files=("config.yaml", "am.mvn", "configuration.json", "tokens.json"))
    problems = ProblemList(f"--audio {path}")
    _classify(source, FUNASR_FOLDER_DROPS, problems)
    problems.raise_if_any()
    return source


def open_audio(path: str, llm_width: int, downsample: Optional[int]) -> EncoderSource:
    """An HF Whisper folder (config.json, model_type whisper) or a FunASR Paraformer folder (model.pt)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as f:
            model_type = json.load(f).get("model_type")
        if model_type != "whisper":
            raise ConversionError(f"--audio {path}", {"unsupported config": [
                f"model_type={model_type!r}: --audio takes an HF Whisper folder or a FunASR Paraformer folder "
                "(model.pt + config.yaml + am.mvn)"]})
        return open_whisper(path, llm_width, downsample or 4)
    return open_funasr(path, llm_width, downsample or 3)
