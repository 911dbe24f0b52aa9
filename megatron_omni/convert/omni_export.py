"""megatron-omni omni checkpoint -> one Hugging Face folder that transformers runs (`mcore-to-hf`).

    safetensors   model.* / lm_head.weight     the LLM under Llama names (convert/llama.py's table,
                                               the omni vocabulary: text ids, omni specials, audio codes)
                  visual.*                     the vision tower + PatchMerger under Qwen2-VL vision names
                  audio_tower.*                the audio encoder under Whisper encoder names (FunASR SAN-M
                                               names for encoder_type sanm, + audio_tower.cmvn.shift/scale)
                  audio_connector.*            the audio connector (our names)
    config.json   MegatronOmniConfig with auto_map -> the remote-code files copied from megatron_omni/hf/
    tokenizer     the text tokenizer + the omni special tokens and audio codes at their OmniVocab ids
    processor_config.json, preprocessor_config.json   MegatronOmniProcessor (AutoProcessor auto_map)
    generation_config.json

Name tables: convert/omni_mapping.py (encoders), convert/llama.py (LLM).  Every model tensor of the
checkpoint is accounted for before anything is written; the Whisper key bias (zero in ours, absent in
Whisper) is checked to be zero.  `language_model_only=True` writes a plain LlamaForCausalLM folder.
Streams one tensor (one layer of a stacked key) at a time.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from megatron_omni.config.schema import ModelConfig, OmniConfig
from megatron_omni.convert import mcore_io
from megatron_omni.convert.common import (
    HF_SOURCE,
    MODEL_FILE,
    _atomic_output,
    _check_output,
    _layer_major_tensors,
    _Progress,
    _shape,
    _Source,
    dtype_name,
    parse_dtype,
)
from megatron_omni.convert.errors import ConversionError, ProblemList
from megatron_omni.convert.hf_folder import open_hf_folder, parse_size, read_json, write_json, write_safetensors_shards
from megatron_omni.convert.llama import LLAMA
from megatron_omni.convert.mapping import Dims
from megatron_omni.convert.omni_hf_config import (
    audio_problems,
    generation_config,
    omni_config,
    preprocessor_config,
    processor_config,
    vision_problems,
)
from megatron_omni.convert.omni_mapping import EncoderBinding, audio_table, vision_table
from megatron_omni.models.omni_vocab import OmniVocab

# Our checkpoint prefix -> the folder's prefix, for the tensors the tables give source names to.
VISION_PREFIX = "visual."
AUDIO_PREFIX = "audio_tower."
# Tensors no source table names (kept under our names below a folder prefix).
UNSOURCED_NAMES = {"audio.connector.": "audio_connector.", "audio.cmvn.": AUDIO_PREFIX + "cmvn."}

Entry = Tuple[str, torch.dtype, Tuple[int, ...]]


def omni_configs(root: str, explicit: Optional[str] = None) -> Optional[Tuple[ModelConfig, OmniConfig, str]]:
    """(model, omni, config path) when the checkpoint's config (explicit, <root>/model.yaml bundle, or the
    run's <root>/../config.yaml; omni_import.find_omni_config) has an `omni:` section; None otherwise."""
    from megatron_omni.convert.omni_import import find_omni_config

    try:
        model, omni = find_omni_config(root, explicit)
    except FileNotFoundError:
        return None
    if omni is None:
        return None
    path = next(p for p in ([explicit] if explicit else [os.path.join(root, MODEL_FILE),
                                                          os.path.join(os.path.dirname(root), "config.yaml")])
                if p and os.path.isfile(p))
    return model, omni, path


@dataclasses.dataclass
class _Plan:
    llm: _Source
    encoders: List[Tuple[str, EncoderBinding]]  # (folder prefix, binding)
    unsourced: List[Tuple[str, str]]  # (our key, folder name)
    entries: List[Entry]


def _layer_shape(reader: mcore_io.CheckpointReader, b: EncoderBinding) -> Tuple[int, ...]:
    shape = reader.tensors[b.key][0]
    return tuple(shape[1:]) if b.index is not None else tuple(shape)


def _plan(reader: mcore_io.CheckpointReader, model: ModelConfig, omni: OmniConfig, vocab: OmniVocab,
          dtype: Optional[torch.dtype], language_model_only: bool, problems: ProblemList) -> _Plan:
    """Every tensor of the folder (name, dtype, shape) and where it comes from; coverage checked."""
    present = set(reader.model_keys())
    model_v = dataclasses.replace(model, vocab_size=vocab.size)
    probe = LLAMA.bindings(model_v, Dims.of(model_v))
    vocab_key = probe[0].key
    padded = reader.tensors[vocab_key][0][0] if vocab_key in reader.tensors else vocab.size
    if padded < vocab.size:
        problems.add("shape mismatches", f"{vocab_key} has {padded} rows < the omni vocabulary {vocab.size} "
                                         f"(text {vocab.text_vocab_size} + specials + {vocab.audio_codebook_size} codes)")
    dims = Dims.of(model_v, padded_vocab=padded)
    llm_bindings = LLAMA.bindings(model_v, dims)
    consumed = set()
    for key, shape in LLAMA.checkpoint_shapes(model_v, dims).items():
        consumed.add(key)
        if key not in reader.tensors:
            problems.add("target tensors not written", f"checkpoint has no {key}")
        elif tuple(reader.tensors[key][0]) != tuple(shape):
            problems.add("shape mismatches", f"{key}: checkpoint has {_shape(reader.tensors[key][0])}, the model "
                                             f"config implies {_shape(shape)}")
    encoders: List[Tuple[str, EncoderBinding]] = []
    unsourced: List[Tuple[str, str]] = []
    tables = []
    if omni.vision is not None:
        problems.extend("unsupported config", vision_problems(omni.vision))
        tables.append((VISION_PREFIX, vision_table(omni.vision)))
    if omni.audio is not None:
        problems.extend("unsupported config", audio_problems(omni.audio))
        tables.append((AUDIO_PREFIX, audio_table(omni.audio)))
    for prefix, table in tables:
        for b in table.bindings():
            consumed.add(b.key)
            if b.key not in reader.tensors:
                problems.add("target tensors not written", f"{prefix}{b.source[0]}: checkpoint has no {b.key}")
            elif b.index is not None and reader.tensors[b.key][0][0] != table.num_layers:
                problems.add("shape mismatches", f"{b.key}: {reader.tensors[b.key][0][0]} layers, the config has "
                                                 f"{table.num_layers}")
            else:
                encoders.append((prefix, b))
        for key in sorted(present):
            if table.is_unsourced(key):
                consumed.add(key)
                ours = next(p for p in UNSOURCED_NAMES if key.startswith(p))
                unsourced.append((key, UNSOURCED_NAMES[ours] + key[len(ours):]))
    for key in sorted(present - consumed):
        problems.add("source tensors not consumed", f"{key} {_shape(reader.tensors[key][0])}")
    problems.raise_if_any()
    out_dtype = dtype or reader.tensors[vocab_key][1]
    llm = _Source(reader=reader, model=model_v, table=LLAMA, dims=dims, bindings=llm_bindings, notes=[])
    entries: List[Entry] = [(n, out_dtype, tuple(s)) for b in llm_bindings for n, s in zip(b.hf_names, b.hf_shapes)]
    if language_model_only:
        return _Plan(llm, [], [], entries)
    for prefix, b in encoders:
        shapes = b.source_shapes(_layer_shape(reader, b))
        entries += [(prefix + n, out_dtype, tuple(s)) for n, s in zip(b.source, shapes)]
    entries += [(name, out_dtype, tuple(reader.tensors[key][0])) for key, name in unsourced]
    return _Plan(llm, encoders, unsourced, entries)


def _tensors(plan: _Plan, dtype: torch.dtype, progress: _Progress) -> Iterator[Tuple[str, torch.Tensor]]:
    """The folder's tensors in `plan.entries` order, one checkpoint read at a time."""
    reader = plan.llm.reader
    yield from _layer_major_tensors(plan.llm, dtype, progress)
    for prefix, b in plan.encoders:
        ours = reader.read({"t": (b.key, b.index)})["t"]
        if b.rule.transform.name == "fuse_qv_bias":
            heads = b.rule.transform.heads
            k_bias = ours.view(heads, 3, -1)[:, 1]
            if k_bias.abs().max() != 0:
                raise ConversionError(f"mcore-to-hf {reader.path}", {"source tensors not consumed": [
                    f"{b.key} layer {b.layer}: the key part of the fused QKV bias is not zero "
                    f"(max |k bias| {float(k_bias.abs().max()):.3e}); Whisper has no k_proj bias, so this model "
                    "cannot be exported exactly"]})
        for name, t in zip(b.source, b.to_source(ours)):
            t = t.to(dtype).contiguous()
            progress.tick(t, prefix + name)
            yield prefix + name, t
    for key, name in plan.unsourced:
        t = reader.read({"t": (key, None)})["t"].to(dtype).contiguous()
        progress.tick(t, name)
        yield name, t


def omni_to_hf(load: str, out: str, *, model_yaml: Optional[str] = None, dtype: Optional[str] = None,
               tokenizer_dir: Optional[str] = None, template_dir: Optional[str] = None,
               max_shard_size: str = "5GB", language_model_only: bool = False,
               overwrite: bool = False) -> Dict[str, object]:
    """Omni checkpoint (any layout) -> HF folder (MegatronOmniForCausalLM, or LlamaForCausalLM with
    `language_model_only`)."""
    from megatron_omni.convert.lora_merge import open_checkpoint_reader
    from megatron_omni.convert.omni_tokenizer import write_omni_tokenizer
    from megatron_omni.hf import HF_DIR, REMOTE_CODE_FILES

    started = time.time()
    _check_output(out, overwrite)
    root, path = mcore_io.resolve_iteration(load)
    found = omni_configs(root, model_yaml)
    if found is None:
        raise ConversionError(f"mcore-to-hf {load}", {"unsupported config": [
            "no omni: section in the checkpoint's config (model.yaml / ../config.yaml / --model)"]})
    model, omni, config_path = found
    vocab = OmniVocab(model.vocab_size, omni.audio_codebook_size)
    if template_dir is None and os.path.isdir(os.path.join(root, HF_SOURCE)):
        template_dir = os.path.join(root, HF_SOURCE)
    problems = ProblemList(f"mcore-to-hf {path} (model config {config_path})")
    template = read_json(os.path.join(template_dir, "config.json"), "template config", problems) if template_dir else None
    reader = open_checkpoint_reader(path)  # an alignment-tuning run: LoRA folded into its base weights
    plan = _plan(reader, model, omni, vocab, parse_dtype(dtype), language_model_only, problems)
    out_dtype = plan.entries[0][1]
    progress = _Progress("mcore-to-hf (omni)")
    with _atomic_output(out, overwrite) as tmp:
        write_safetensors_shards(tmp, plan.entries, _tensors(plan, out_dtype, progress), parse_size(max_shard_size))
        if language_model_only:
            config = LLAMA.config_to_hf(plan.llm.model, dtype=dtype_name(out_dtype), template=template)
        else:
            config = omni_config(plan.llm.model, omni, vocab, dtype=dtype_name(out_dtype), template=template,
                                 bundle={"model": dataclasses.asdict(model), "omni": dataclasses.asdict(omni)})
            for name in REMOTE_CODE_FILES:
                shutil.copy2(os.path.join(HF_DIR, name), os.path.join(tmp, name))
            write_json(os.path.join(tmp, "preprocessor_config.json"), preprocessor_config(omni))
            write_json(os.path.join(tmp, "processor_config.json"), processor_config(omni))
        write_json(os.path.join(tmp, "config.json"), config)
        write_json(os.path.join(tmp, "generation_config.json"), generation_config(config, vocab))
        tokenizer = write_omni_tokenizer(tmp, vocab, tokenizer_dir or template_dir, config_path)
        check = open_hf_folder(tmp)  # what was written reads back with the planned names and shapes
        if {n: (i.dtype, i.shape) for n, i in check.tensors.items()} != {n: (d, s) for n, d, s in plan.entries}:
            raise RuntimeError("written HF folder does not hold the planned tensors")
        check.close()
    notes = [f"dropped vocabulary padding rows {vocab.size}..{plan.llm.dims.padded_vocab - 1}"] \
        if plan.llm.dims.padded_vocab != vocab.size else []
    adapters = len(getattr(reader, "adapters", ()))
    if adapters:
        notes.append(f"merged the LoRA adapters of {adapters} (layer-stacked) weights into them "
                     f"(alpha {reader.alpha or 'rank'})")
    skipped = len(reader.tensors) - len(reader.model_keys()) - 2 * adapters
    if skipped:
        notes.append(f"skipped {skipped} optimizer-state tensors (weights are converted, not optimizer state)")
    return {"out": os.path.abspath(out), "tensors": progress.count, "bytes": progress.bytes,
            "dtype": dtype_name(out_dtype), "architecture": config["architectures"][0], "vocab": vocab.size,
            "tokenizer": tokenizer, "notes": notes, "seconds": round(time.time() - started, 1)}
