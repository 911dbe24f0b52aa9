"""HF <-> megatron-omni checkpoint conversion, and resharding, driven by the model tables.

Every operation first checks everything it can without reading tensor data -- the
source's files and headers, the table expanded for the config, the structure megatron
builds for the target -- and raises one `ConversionError` listing every source tensor
not consumed, every target tensor not written and every shape mismatch.  Only then does
it write, tensor by tensor, into a temporary sibling of the output folder that is renamed
into place at the very end: an interrupted or failed conversion leaves no output folder.

Output of hf_to_mcore / reshard (a checkpoints root, as `train.load=` expects):
    <out>/iter_0000000/               megatron torch_dist checkpoint, weights only (training starts at step 1)
    <out>/latest_checkpointed_iteration.txt
    <out>/model.yaml                  the ModelConfig: train with `model=<out>/model.yaml train.load=<out>`
    <out>/conversion.json             provenance: model family, source, layout, dtype, vocab padding
    <out>/hf_source/                  config.json, generation_config.json, tokenizer files of the HF source
                                      (used as the template when exporting back to HF)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Dict, Optional

import torch
import yaml

from megatron_omni.config.schema import ModelConfig
from megatron_omni.convert import mcore_io
from megatron_omni.convert.common import (
    HF_SOURCE,
    Layout,
    _atomic_output,
    _build_target,
    _check_output,
    _check_tied_copies,
    _hf_input_problems,
    _LastTensor,
    _layer_major_tensors,
    _open_source,
    _Progress,
    _region,
    _shape,
    _vocab_key,
    _write_checkpoint,
    dtype_name,
    find_model_config,
    parse_dtype,
)
from megatron_omni.convert.errors import ConversionError, ProblemList
from megatron_omni.convert.hf_folder import (
    TOKENIZER_FILES,
    copy_files,
    open_hf_folder,
    parse_size,
    read_json,
    write_json,
    write_safetensors_shards,
)
from megatron_omni.convert.mapping import Dims, LazyTensor
from megatron_omni.convert.omni_export import omni_configs, omni_to_hf
from megatron_omni.convert.omni_reimport import is_exported_omni_folder, omni_hf_to_mcore
from megatron_omni.convert.registry import table_for_hf_config


def hf_to_mcore(hf_dir: str, out: str, *, tp: int = 1, pp: int = 1, vpp: Optional[int] = None, ep: int = 1,
                dtype: Optional[str] = None, make_vocab_size_divisible_by: int = 128,
                overwrite: bool = False) -> Dict[str, object]:
    """HF LlamaForCausalLM folder -> megatron-omni checkpoints root that `train.load=` resumes from; a folder
    `mcore-to-hf` exported from an omni checkpoint -> that omni checkpoint (convert/omni_reimport.py)."""
    if is_exported_omni_folder(hf_dir):
        return omni_hf_to_mcore(hf_dir, out, tp=tp, pp=pp, vpp=vpp, dtype=dtype, overwrite=overwrite)
    started = time.time()
    _check_output(out, overwrite)
    hf = open_hf_folder(hf_dir)
    table = table_for_hf_config(hf.config)
    model = table.config_from_hf(hf.config, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    layout = Layout(tp=tp, pp=pp, vpp=vpp, ep=ep)
    problems = ProblemList(f"hf-to-mcore {hf_dir}")
    problems.extend("invalid layout", layout.problems(model))
    problems.raise_if_any()
    dims = Dims.of(model, padded_vocab=model.padded_vocab_size(tp))
    bindings = table.bindings(model, dims)
    notes = _hf_input_problems(hf, table, model, bindings, problems)
    problems.raise_if_any()
    notes += _check_tied_copies(hf, table, model, problems)
    problems.raise_if_any()

    vocab_key = _vocab_key(bindings)
    if dtype is not None:
        out_dtype = parse_dtype(dtype)
    else:  # the source's dtype (of the embedding; mixed-dtype sources are cast to it)
        first = next(b for b in bindings if b.key == vocab_key) if vocab_key else bindings[0]
        out_dtype = hf.tensors[first.hf_names[0]].dtype
    by_slot = {(b.key, b.layer): b for b in bindings}
    layered = {b.key for b in bindings if b.layer is not None}
    cache = _LastTensor()
    progress = _Progress("hf-to-mcore")

    def lazy(name: str) -> LazyTensor:
        return LazyTensor(hf.tensors[name].shape, load=lambda dt: hf.read(name, dt),
                          load_into=lambda t: hf.read_into(name, t))

    def provider(chunk: mcore_io.Chunk) -> torch.Tensor:
        layer = chunk.offsets[0] if chunk.key in layered else None
        binding = by_slot[(chunk.key, layer)]

        def compute():
            full = binding.rule.transform.to_mcore_lazy([lazy(n) for n in binding.hf_names], dims, chunk.dtype)
            if tuple(full.shape) != binding.mcore_shape:
                raise RuntimeError(f"{binding.rule.transform.name} gave {_shape(full.shape)} for {chunk.key}")
            return full
        piece = _region(binding, chunk, cache.get((chunk.key, layer), compute))
        progress.tick(piece, f"{chunk.key} layer {layer}")
        return piece

    with mcore_io.megatron_world():
        sd = _build_target(table, model, layout, out_dtype, dims, problems)
        problems.raise_if_any()
        with _atomic_output(out, overwrite) as tmp:
            source = {"kind": "hf", "path": os.path.abspath(hf_dir), "files": hf.files}
            _write_checkpoint(tmp, sd, provider, table=table, model=model, dims=dims, layout=layout,
                              dtype=out_dtype, source=source)
            os.makedirs(os.path.join(tmp, HF_SOURCE))
            copy_files(hf_dir, os.path.join(tmp, HF_SOURCE), ("config.json", "generation_config.json") + TOKENIZER_FILES)
    hf.close()
    return {"out": os.path.abspath(out), "tensors": progress.count, "bytes": progress.bytes,
            "dtype": dtype_name(out_dtype), "layout": layout.common(), "vocab": model.vocab_size,
            "padded_vocab": dims.padded_vocab, "notes": notes, "seconds": round(time.time() - started, 1)}


def mcore_to_hf(load: str, out: str, *, model_yaml: Optional[str] = None, dtype: Optional[str] = None,
                tokenizer_dir: Optional[str] = None, template_dir: Optional[str] = None,
                max_shard_size: str = "5GB", overwrite: bool = False,
                language_model_only: bool = False) -> Dict[str, object]:
    """megatron-omni checkpoint (any layout; weights of a training checkpoint) -> HF LlamaForCausalLM folder;
    an omni checkpoint -> one MegatronOmniForCausalLM folder (convert/omni_export.py), or with
    `language_model_only` a LlamaForCausalLM folder of its LLM."""
    started = time.time()
    _check_output(out, overwrite)
    root, _ = mcore_io.resolve_iteration(load)
    if omni_configs(root, model_yaml) is not None:
        return omni_to_hf(load, out, model_yaml=model_yaml, dtype=dtype, tokenizer_dir=tokenizer_dir,
                          template_dir=template_dir, max_shard_size=max_shard_size,
                          language_model_only=language_model_only, overwrite=overwrite)
    if template_dir is None and os.path.isdir(os.path.join(root, HF_SOURCE)):
        template_dir = os.path.join(root, HF_SOURCE)
    problems = ProblemList(f"mcore-to-hf {load}")
    template = read_json(os.path.join(template_dir, "config.json"), "template config", problems) if template_dir else None
    if tokenizer_dir is not None and not any(os.path.isfile(os.path.join(tokenizer_dir, f)) for f in TOKENIZER_FILES):
        problems.add("unreadable files", f"--tokenizer-dir {tokenizer_dir}: none of {list(TOKENIZER_FILES)}")
    problems.raise_if_any()
    progress = _Progress("mcore-to-hf")
    src = _open_source(load, model_yaml, "mcore-to-hf")  # reading needs no process group
    out_dtype = parse_dtype(dtype) or src.reader.tensors[src.bindings[0].key][1]
    entries = [(name, out_dtype, tuple(shape)) for b in src.bindings for name, shape in zip(b.hf_names, b.hf_shapes)]
    with _atomic_output(out, overwrite) as tmp:
        write_safetensors_shards(tmp, entries, _layer_major_tensors(src, out_dtype, progress),
                                 parse_size(max_shard_size))
        write_json(os.path.join(tmp, "config.json"),
                   src.table.config_to_hf(src.model, dtype=dtype_name(out_dtype), template=template))
        copied = []
        if template_dir:
            copied += copy_files(template_dir, tmp, ["generation_config.json"])
        if not copied:
            gen = {"_from_model_config": True}
            gen.update({k: template[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                        if template and template.get(k) is not None})
            write_json(os.path.join(tmp, "generation_config.json"), gen)
        tok_from = tokenizer_dir or template_dir
        if tok_from:
            copied += copy_files(tok_from, tmp, TOKENIZER_FILES)
        check = open_hf_folder(tmp)  # what was written reads back with the planned names and shapes
        got = {n: (i.dtype, i.shape) for n, i in check.tensors.items()}
        if got != {n: (d, s) for n, d, s in entries}:
            raise RuntimeError("written HF folder does not hold the planned tensors")
        check.close()
    return {"out": os.path.abspath(out), "tensors": progress.count, "bytes": progress.bytes,
            "dtype": dtype_name(out_dtype), "copied": copied, "notes": src.notes,
            "seconds": round(time.time() - started, 1)}


def reshard(load: str, out: str, *, tp: int = 1, pp: int = 1, vpp: Optional[int] = None, ep: int = 1,
            model_yaml: Optional[str] = None, dtype: Optional[str] = None, overwrite: bool = False) -> Dict[str, object]:
    """megatron-omni checkpoint -> weights-only checkpoint for another layout (vocabulary re-padded for its TP).

    Training checkpoints already load at any layout (train.load= reshards on load, optimizer included);
    this writes a clean weights-only copy for a given layout, e.g. for release or evaluation."""
    started = time.time()
    _check_output(out, overwrite)
    root, _ = mcore_io.resolve_iteration(load)
    layout = Layout(tp=tp, pp=pp, vpp=vpp, ep=ep)
    problems = ProblemList(f"reshard {load}")
    problems.extend("invalid layout", layout.problems(find_model_config(root, model_yaml)[0]))
    problems.raise_if_any()
    src = _open_source(load, model_yaml, "reshard")
    progress = _Progress("reshard")
    with mcore_io.megatron_world():
        model, table = src.model, src.table
        out_dtype = parse_dtype(dtype) or src.reader.tensors[src.bindings[0].key][1]
        dims = Dims.of(model, padded_vocab=model.padded_vocab_size(tp))
        bindings = table.bindings(model, dims)
        src_by_slot = {(b.key, b.layer): b for b in src.bindings}
        by_slot = {(b.key, b.layer): b for b in bindings}
        layered = {b.key for b in bindings if b.layer is not None}
        sd = _build_target(table, model, layout, out_dtype, dims, problems)
        problems.raise_if_any()
        cache = _LastTensor()

        def provider(chunk: mcore_io.Chunk) -> torch.Tensor:
            layer = chunk.offsets[0] if chunk.key in layered else None
            binding, src_binding = by_slot[(chunk.key, layer)], src_by_slot[(chunk.key, layer)]

            def compute():
                t = src.reader.read({"t": (chunk.key, layer)})["t"]
                hf_tensors = src_binding.rule.transform.to_hf(t, src.dims)
                return binding.rule.transform.to_mcore(hf_tensors, dims)
            piece = _region(binding, chunk, cache.get((chunk.key, layer), compute))
            progress.tick(piece, f"{chunk.key} layer {layer}")
            return piece

        with _atomic_output(out, overwrite) as tmp:
            source = {"kind": "mcore", "path": src.reader.path}
            _write_checkpoint(tmp, sd, provider, table=table, model=model, dims=dims, layout=layout,
                              dtype=out_dtype, source=source)
            if os.path.isdir(os.path.join(root, HF_SOURCE)):
                shutil.copytree(os.path.join(root, HF_SOURCE), os.path.join(tmp, HF_SOURCE))
    return {"out": os.path.abspath(out), "tensors": progress.count, "bytes": progress.bytes,
            "dtype": dtype_name(out_dtype), "layout": layout.common(), "padded_vocab": dims.padded_vocab,
            "notes": src.notes + [f"vocabulary padded to {dims.padded_vocab} rows for tp={tp}"],
            "seconds": round(time.time() - started, 1)}
