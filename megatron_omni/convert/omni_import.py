"""Pretrained Hugging Face parts -> an omni megatron checkpoint (issue 13, `omni-from-hf`).

    omni_from_hf("Llama-3.1-8B", "ckpt/m2omni_9b", vision_dir="Qwen2-VL-7B-Instruct",
                 audio_dir="paraformer-zh", tp=2, pp=2)          # then: train.pretrained_checkpoint=ckpt/m2omni_9b

The LLM comes from an HF LlamaForCausalLM folder (convert/llama.py's table), the vision tower from
a Qwen2-VL folder, the audio encoder from an HF Whisper folder or a FunASR Paraformer folder
(omni_sources.py opens them and translates their configs; omni_mapping.py holds the name tables).
Everything is checked before anything is written -- every source tensor consumed or dropped with
a reason, every target tensor of the OmniModel megatron would build produced, every shape -- and
the checkpoint is then streamed tensor by tensor (mcore_io.save_streaming) into a temporary folder
renamed into place at the end.

Tensors no source has are initialised by a stated rule and listed in OUT/conversion_report.json:
  * the omni vocabulary rows (special tokens, speech codes) of the embedding and output layer:
    the mean of the LLM's own rows plus N(0, (NEW_ROW_NOISE * per-dimension std)^2) noise from a
    generator seeded by (seed, tensor name); TP padding rows stay zero;
  * the connectors no source provides (the audio connector; the vision merger's last projection
    when the source merger's width differs from the LLM's): models/init.py's layout-invariant rule,
    the values `init_omni_weights_layout_invariant` gives them with the same seed.
"""

from __future__ import annotations

import dataclasses
import os
import time
import types
import zlib
from typing import Callable, Dict, List, Optional, Tuple

import torch
import yaml

from megatron_omni.config.loader import ConfigError, from_dict
from megatron_omni.config.schema import ModelConfig, OmniConfig, ParallelConfig
from megatron_omni.convert import mcore_io
from megatron_omni.convert.common import (
    CONVERSION_FILE,
    HF_SOURCE,
    MODEL_FILE,
    Layout,
    _atomic_output,
    _check_output,
    _check_tied_copies,
    _hf_input_problems,
    _LastTensor,
    _Progress,
    _region,
    _shape,
    table_shape_problems,
    dtype_name,
    parse_dtype,
    write_iteration,
)
from megatron_omni.convert.errors import ConversionError, ProblemList
from megatron_omni.convert.hf_folder import TOKENIZER_FILES, copy_files, open_hf_folder, write_json
from megatron_omni.convert.llama import LLAMA
from megatron_omni.convert.mapping import Dims, LazyTensor
from megatron_omni.convert.omni_mapping import OMNI_VOCAB_KEYS, VISION_OUTPUT_PROJECTION
from megatron_omni.convert.omni_sources import EncoderSource, open_audio, open_vision
from megatron_omni.models.omni_vocab import OmniVocab

REPORT_FILE = "conversion_report.json"
NEW_ROW_NOISE = 0.01  # new vocabulary rows: mean + N(0, (0.01 * std of each dimension)^2)
LLM_FILE, OMNI_FILE = "llm.yaml", "omni.yaml"  # the two sections alone: model=OUT/llm.yaml omni=OUT/omni.yaml


# --------------------------------------------------------------------------------------
# Configs


def mrope_section(head_dim: int) -> List[int]:
    """Qwen2-VL's (t, h, w) split of the head_dim/2 rotary frequencies ([16, 24, 24] for 128) at any head_dim."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def layout_problems(layout: Layout, model: ModelConfig, first_stage_num_layers: Optional[int]) -> List[str]:
    if first_stage_num_layers is None:
        return layout.problems(model)
    even = dataclasses.replace(layout, pp=1, vpp=None)
    out = even.problems(model)
    k, L, pp = first_stage_num_layers, model.num_layers, layout.pp
    if layout.vpp is not None:
        out.append("--vpp with --first-stage-num-layers is not supported; drop one of them")
    if pp < 2:
        out.append("--first-stage-num-layers needs --pp >= 2")
    elif not 0 < k < L or (L - k) % (pp - 1):
        out.append(f"--first-stage-num-layers={k}: the other {L - k} of num_layers={L} layers must split "
                   f"evenly over the remaining {pp - 1} stages")
    return out


def find_omni_config(root: str, explicit: Optional[str] = None) -> Tuple[ModelConfig, Optional[OmniConfig]]:
    """(ModelConfig, OmniConfig or None) of a checkpoints root: `explicit`, else <root>/model.yaml,
    else <root>/../config.yaml (a training run's).  Section files (`model: llm.yaml`) are resolved."""
    from megatron_omni.config.loader import load_yaml_tree

    candidates = [explicit] if explicit else [os.path.join(root, MODEL_FILE),
                                              os.path.join(os.path.dirname(root), "config.yaml")]
    for path in candidates:
        if path and os.path.isfile(path):
            try:
                tree = load_yaml_tree(path)
                if not isinstance(tree.get("model"), dict):  # a bare ModelConfig file
                    return from_dict(ModelConfig, tree, "model"), None
                omni = tree.get("omni")
                return (from_dict(ModelConfig, tree["model"], "model"),
                        from_dict(OmniConfig, omni, "omni") if isinstance(omni, dict) else None)
            except (ConfigError, ValueError) as e:
                raise ConversionError(f"model config {path}", {"unsupported config": [str(e)]}) from e
    raise FileNotFoundError(
        f"no model config for {root}: looked for {' and '.join(c for c in candidates if c)}; pass --model MODEL.yaml")


def _write_bundle(tmp: str, model: ModelConfig, omni: OmniConfig, sources: Dict[str, str]) -> None:
    model_d, omni_d = dataclasses.asdict(model), dataclasses.asdict(omni)
    head = ("# Omni model bundle of this converted checkpoint (omni-from-hf from "
            + ", ".join(f"{k}={v}" for k, v in sources.items()) + ").\n"
            "# Start a stage from it:  base: <this file> in the run config (or model=llm.yaml omni=omni.yaml on\n"
            "# the command line) and train.pretrained_checkpoint=<this folder>.\n")
    with open(os.path.join(tmp, MODEL_FILE), "w") as f:
        f.write(head)
        yaml.safe_dump({"model": model_d, "omni": omni_d}, f, sort_keys=False)
    for name, data in ((LLM_FILE, model_d), (OMNI_FILE, omni_d)):
        with open(os.path.join(tmp, name), "w") as f:
            yaml.safe_dump(data, f, sort_keys=False)


# --------------------------------------------------------------------------------------
# Unsourced tensors


def _generator(seed: int, name: str) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    return gen


def fill_new_vocab_rows(full: torch.Tensor, text_rows: int, new_rows: int, seed: int, name: str) -> torch.Tensor:
    """Rows [text_rows, text_rows + new_rows) of `full` := mean of rows [0, text_rows) + seeded noise (in place)."""
    total = torch.zeros(full.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, text_rows, 4096):  # in row blocks: no fp32 copy of a 128k-row embedding
        block = full[start:min(start + 4096, text_rows)].double()
        total += block.sum(0)
        squares += (block * block).sum(0)
        del block
    mean = total / text_rows
    std = ((squares - text_rows * mean * mean).clamp(min=0) / max(text_rows - 1, 1)).sqrt()
    mean, std = mean.float(), std.float()
    noise = torch.randn((new_rows, full.shape[1]), generator=_generator(seed, name + ":new_rows"))
    full[text_rows:text_rows + new_rows] = (mean + noise * (NEW_ROW_NOISE * std)).to(full.dtype)
    return full


def layout_invariant_init(key: str, shape: Tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    """models/init.py's encoder rule for one full tensor: biases 0, 1-D weights 1, matrices N(0, std)
    drawn from (seed, key) -- the key is the parameter's name in OmniModel."""
    from megatron_omni.models.init import _draw_full

    if len(shape) == 1:
        return torch.zeros(shape) if key.endswith("bias") else torch.ones(shape)
    return _draw_full(torch.empty(0), shape, seed, key, std)


# --------------------------------------------------------------------------------------
# The target: the OmniModel megatron builds, on the meta device


def _omni_target(model: ModelConfig, omni: OmniConfig, layout: Layout, dtype: torch.dtype):
    """The sharded state dict (weights only) of `model` + `omni`, with the omni vocabulary padded for
    layout.tp, from a single-process meta build (the checkpoint's tensors are global)."""
    from megatron_omni.models.omni import build_omni_chunks

    build = dataclasses.replace(model, transformer_impl="local", fp8=None,
                                make_vocab_size_divisible_by=model.make_vocab_size_divisible_by * layout.tp)
    vision = dataclasses.replace(omni.vision, transformer_impl="local") if omni.vision is not None else None
    with mcore_io.MetaDevice():
        chunks = build_omni_chunks(build, ParallelConfig(), dataclasses.replace(omni, vision=vision),
                                   seq_length=128, params_dtype=dtype)
    sd = mcore_io.model_sharded_state_dict(chunks, dtype)
    return sd, {k: s for k, (s, _) in mcore_io.sharded_tensor_shapes(sd).items()}


# --------------------------------------------------------------------------------------
# Import


Producer = Callable[[torch.dtype], torch.Tensor]  # dtype -> one layer's (or an unstacked) full tensor


def _encoder_plan(src: EncoderSource, target: Dict[str, Tuple[int, ...]], llm_width: int, seed: int,
                  plan: Dict[Tuple[str, Optional[int]], Producer], initialised: Dict[str, str],
                  dropped: Dict[str, str], problems: ProblemList) -> None:
    """Producers for one encoder's target tensors; every problem (missing / reshaped source tensor,
    target tensor nobody provides) is added to `problems`."""
    reinit = set()
    if src.role == "vision" and src.source_out_width != llm_width:
        reinit = set(VISION_OUTPUT_PROJECTION)
    bound = set()
    for b in src.table.bindings():
        if b.key not in target:
            problems.add("table rules megatron does not have", f"{b.key} (from {src.role} {', '.join(b.source)})")
            continue
        bound.add(b.key)
        names = [src.source_name(n) for n in b.source]
        if b.key in reinit:
            for n in names:
                dropped[f"{src.role}:{n}"] = (f"source merger projects to {src.source_out_width}, the LLM width is "
                                              f"{llm_width}: {b.key} re-initialised")
            continue
        ours = target[b.key][1:] if b.index is not None else target[b.key]
        for n, want in zip(names, b.source_shapes(ours)):
            if n not in src.tensors:
                problems.add("target tensors not written", f"{b.key}: {src.role} folder {src.path} has no {n} "
                                                           f"{_shape(want)}")
            elif tuple(src.tensors[n][0]) != tuple(want):
                problems.add("shape mismatches", f"{src.role} {n}: file has {_shape(src.tensors[n][0])}, the "
                                                 f"config implies {_shape(want)} (for {b.key})")
            elif not src.tensors[n][1].is_floating_point:
                problems.add("unsupported dtypes", f"{src.role} {n}: {src.tensors[n][1]}")
        plan[(b.key, b.index)] = (lambda b=b, names=names: lambda dt: b.to_ours([src.read(n, dt) for n in names]))()
    for key, value in src.extra.items():
        if key not in target or tuple(target[key]) != tuple(value.shape):
            problems.add("shape mismatches", f"{key}: {src.role} gives {_shape(value.shape)}, the model has "
                                             f"{_shape(target.get(key, ()))}")
            continue
        bound.add(key)
        plan[(key, None)] = lambda dt, v=value: v.to(dt)
    for name, reason in src.drops.items():
        dropped[f"{src.role}:{name}"] = reason
    std = src.config.init_method_std
    for key in sorted(k for k in target if k.startswith(src.table.prefix)):
        if key in bound and key not in reinit:
            continue
        if not (src.table.is_unsourced(key) or key in reinit):
            problems.add("target tensors not written", f"{key} {_shape(target[key])}: no {src.table.name} rule")
            continue
        if key.startswith(src.table.prefix + "cmvn."):
            problems.add("target tensors not written", f"{key}: the audio source has no CMVN statistics (am.mvn)")
            continue
        plan[(key, None)] = lambda dt, key=key: layout_invariant_init(key, target[key], std, seed).to(dt)
        initialised[key] = f"layout-invariant init (seed {seed}, std {std}; biases 0, norm weights 1)"


def omni_from_hf(llm_dir: str, out: str, *, vision_dir: Optional[str] = None, audio_dir: Optional[str] = None,
                 tp: int = 1, pp: int = 1, vpp: Optional[int] = None, first_stage_num_layers: Optional[int] = None,
                 audio_codebook_size: int = 4096, dtype: Optional[str] = None, seed: int = 1234,
                 make_vocab_size_divisible_by: int = 128, overwrite: bool = False) -> Dict[str, object]:
    """HF LlamaForCausalLM (+ Qwen2-VL vision tower, + Whisper / FunASR audio encoder) folders ->
    an omni checkpoints root that `train.pretrained_checkpoint=` starts a stage from."""
    started = time.time()
    _check_output(out, overwrite)
    hf = open_hf_folder(llm_dir)
    model = LLAMA.config_from_hf(hf.config, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    layout = Layout(tp=tp, pp=pp, vpp=vpp)
    problems = ProblemList(f"omni-from-hf --llm {llm_dir}")
    problems.extend("invalid layout", layout_problems(layout, model, first_stage_num_layers))
    problems.raise_if_any()
    sources = [s for s in (open_vision(vision_dir, model.hidden_size) if vision_dir else None,
                           open_audio(audio_dir, model.hidden_size, None) if audio_dir else None) if s is not None]
    by_role = {s.role: s for s in sources}
    try:
        omni = OmniConfig(vision=by_role["vision"].config if "vision" in by_role else None,
                          audio=by_role["audio"].config if "audio" in by_role else None,
                          audio_codebook_size=audio_codebook_size, mrope_section=mrope_section(model.head_dim))
        vocab = OmniVocab(model.vocab_size, audio_codebook_size)
    except ValueError as e:
        raise ConversionError("omni-from-hf", {"unsupported config": [str(e)]}) from e
    padded = model.padded_vocab_size(tp, vocab.size)
    dims = Dims.of(model, padded_vocab=padded)
    bindings = LLAMA.bindings(model, dims)
    notes = _hf_input_problems(hf, LLAMA, model, bindings, problems)
    problems.raise_if_any()
    notes += _check_tied_copies(hf, LLAMA, model, problems)
    problems.raise_if_any()
    out_dtype = parse_dtype(dtype) or hf.tensors[bindings[0].hf_names[0]].dtype

    initialised: Dict[str, str] = {}
    dropped: Dict[str, str] = {f"llm:{n}": d.reason for d, names in LLAMA.drops_for(model) for n in names
                               if n in hf.tensors}
    plan: Dict[Tuple[str, Optional[int]], Producer] = {}
    progress = _Progress("omni-from-hf")
    with mcore_io.megatron_world():
        sd, target = _omni_target(model, omni, layout, out_dtype)
        expected = LLAMA.checkpoint_shapes(model, dims)
        table_shape_problems(problems, target, expected, LLAMA.name)
        for b in bindings:
            lazy = [LazyTensor(hf.tensors[n].shape, load=lambda dt, n=n: hf.read(n, dt),
                               load_into=lambda t, n=n: hf.read_into(n, t)) for n in b.hf_names]

            def produce(dt, b=b, lazy=lazy):
                full = b.rule.transform.to_mcore_lazy(lazy, dims, dt)
                if b.key in OMNI_VOCAB_KEYS:
                    fill_new_vocab_rows(full, model.vocab_size, vocab.size - model.vocab_size, seed, b.key)
                return full
            plan[(b.key, b.layer)] = produce
        for key in OMNI_VOCAB_KEYS:
            if key in expected:
                initialised[f"{key}[{model.vocab_size}:{vocab.size}]"] = (
                    f"omni vocabulary rows (special tokens, {audio_codebook_size} speech codes): mean of the "
                    f"{model.vocab_size} text rows + N(0, ({NEW_ROW_NOISE} x per-dimension std)^2), seed {seed}")
        for src in sources:
            _encoder_plan(src, target, model.hidden_size, seed, plan, initialised, dropped, problems)
        llm_keys = set(expected)
        for key in sorted(target):
            if key not in llm_keys and not key.startswith(tuple(s.table.prefix for s in sources)):
                problems.add("target tensors not written", f"{key} {_shape(target[key])}")
        problems.raise_if_any()

        source_info = {"llm": os.path.abspath(llm_dir)}
        source_info.update({s.role: os.path.abspath(s.path) for s in sources})
        conversion = {
            "family": "omni", "source": {"kind": "hf", **source_info}, "layout": layout.common(),
            "first_stage_num_layers": first_stage_num_layers, "dtype": dtype_name(out_dtype),
            "vocab_size": model.vocab_size, "omni_vocab_size": vocab.size, "padded_vocab_size": padded,
            "make_vocab_size_divisible_by": model.make_vocab_size_divisible_by,
            "vision": by_role["vision"].kind if "vision" in by_role else None,
            "audio": by_role["audio"].kind if "audio" in by_role else None,
            "seed": seed, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        with _atomic_output(out, overwrite) as tmp:
            write_omni_checkpoint(tmp, sd, target, plan, layout=layout, conversion=conversion, progress=progress,
                                  model=model, omni=omni, sources=source_info)
            os.makedirs(os.path.join(tmp, HF_SOURCE))
            copy_files(llm_dir, os.path.join(tmp, HF_SOURCE), ("config.json", "generation_config.json") + TOKENIZER_FILES)
            for s in sources:
                os.makedirs(os.path.join(tmp, HF_SOURCE, s.role))
                copy_files(s.path, os.path.join(tmp, HF_SOURCE, s.role), s.keep_files)
            report = {
                "initialised": dict(sorted(initialised.items())), "dropped": dict(sorted(dropped.items())),
                "copied_tensors": len({k for k, _ in plan} - set(initialised)),
                "notes": notes, "layout": layout.common(), "dtype": dtype_name(out_dtype),
                "vocab": {"text": model.vocab_size, "omni": vocab.size, "padded": padded},
                "tensors_written": progress.count, "bytes_written": progress.bytes,
                "seconds": round(time.time() - started, 1),
            }
            write_json(os.path.join(tmp, REPORT_FILE), report)
    hf.close()
    for s in sources:
        s.close()
    return {"out": os.path.abspath(out), **report}


def write_omni_checkpoint(tmp: str, sd: Dict[str, object], target: Dict[str, Tuple[int, ...]],
                          plan: Dict[Tuple[str, Optional[int]], Producer], *, layout: Layout,
                          conversion: Dict[str, object], progress: _Progress, model: ModelConfig, omni: OmniConfig,
                          sources: Dict[str, str]) -> None:
    """Stream `plan` ((key, layer or None) -> producer of that full tensor in a dtype) into <tmp> as an
    omni checkpoints root: iter_0000000 (checked to hold exactly `target`), the tracker, model.yaml /
    llm.yaml / omni.yaml and conversion.json.  One tensor is in memory at a time."""
    layered = {k for (k, layer) in plan if layer is not None}
    cache = _LastTensor()

    def provider(chunk: mcore_io.Chunk) -> torch.Tensor:
        layer = chunk.offsets[0] if chunk.key in layered else None
        full = cache.get((chunk.key, layer), lambda: plan[(chunk.key, layer)](chunk.dtype))
        piece = _region(types.SimpleNamespace(layer=layer), chunk, full)  # _region reads .layer only
        progress.tick(piece, f"{chunk.key} layer {layer}")
        return piece

    write_iteration(tmp, sd, provider, layout, conversion, target)
    _write_bundle(tmp, model, omni, sources)
    write_json(os.path.join(tmp, CONVERSION_FILE), conversion)


def _slice(full: torch.Tensor, chunk: mcore_io.Chunk, layer: Optional[int]) -> torch.Tensor:
    """The region of one layer's (or an unstacked) tensor a write chunk covers (convert._region, which reads .layer)."""
    return _region(types.SimpleNamespace(layer=layer), chunk, full)
