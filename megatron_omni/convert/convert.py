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

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import yaml

from megatron_omni.config.loader import ConfigError, from_dict
from megatron_omni.config.schema import ModelConfig, ParallelConfig
from megatron_omni.convert import mcore_io
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
from megatron_omni.convert.mapping import VOCAB_PAD, Binding, Dims, LazyTensor, ModelTable
from megatron_omni.convert.registry import table_for_hf_config, table_named

log = logging.getLogger("megatron_omni.convert")

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
HF_SOURCE = "hf_source"
CONVERSION_FILE = "conversion.json"
MODEL_FILE = "model.yaml"
STEP = 0  # converted checkpoints are weights-only iteration 0: training resumes at step 1


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtype(text: Optional[str]) -> Optional[torch.dtype]:
    if text is None:
        return None
    if text not in DTYPES:
        raise ValueError(f"dtype {text!r}: choose one of bf16, fp16, fp32")
    return DTYPES[text]


# --------------------------------------------------------------------------------------
# Layout


@dataclass(frozen=True)
class Layout:
    """The parallel layout a checkpoint is written for.  The tensors are layout-free (global
    names); the layout fixes the vocabulary padding and is checked against the model."""

    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    ep: int = 1

    def problems(self, model: ModelConfig) -> List[str]:
        out = []
        for name in ("tp", "pp", "ep"):
            if getattr(self, name) < 1:
                out.append(f"--{name} must be >= 1")
        if out:
            return out
        if model.num_attention_heads % self.tp:
            out.append(f"num_attention_heads={model.num_attention_heads} is not divisible by tp={self.tp}")
        if model.num_query_groups % self.tp:
            out.append(f"num_query_groups (key/value heads)={model.num_query_groups} is not divisible by tp={self.tp}")
        if model.ffn_hidden_size % self.tp:
            out.append(f"ffn_hidden_size={model.ffn_hidden_size} is not divisible by tp={self.tp}")
        stages = self.pp * (self.vpp or 1)
        if model.num_layers % stages:
            out.append(f"num_layers={model.num_layers} is not divisible by pp*vpp={stages}")
        if self.vpp is not None and self.pp < 2:
            out.append("--vpp needs --pp >= 2")
        return out

    def common(self) -> Dict[str, int]:
        """The `layout` entry of the checkpoint's common state (as training/checkpoint.py writes it)."""
        return {"tp": self.tp, "pp": self.pp, "dp": 1, "vpp": self.vpp or 1}


# --------------------------------------------------------------------------------------
# Helpers


def _shape(s) -> str:
    return "[" + ", ".join(str(int(x)) for x in s) + "]"


def table_shape_problems(problems, target: Dict[str, tuple], expected: Dict[str, tuple], table_name: str) -> None:
    """Add to `problems` every tensor whose shape in megatron's model (`target`) differs from what the
    table writes (`expected`), and every table rule the model has no tensor for."""
    for key, shape in expected.items():
        if key not in target:
            problems.add("table rules megatron does not have", f"{key} {_shape(shape)}")
        elif tuple(target[key]) != tuple(shape):
            problems.add("shape mismatches", f"{key}: megatron has {_shape(target[key])}, table {table_name!r} "
                                             f"produces {_shape(shape)}")


def find_model_config(root: str, explicit: Optional[str] = None) -> Tuple[ModelConfig, str]:
    """The ModelConfig of a checkpoints root: `explicit`, else <root>/model.yaml (converted checkpoints),
    else <root>/../config.yaml (the run config a training run writes next to its checkpoints/)."""
    candidates = [explicit] if explicit else [os.path.join(root, MODEL_FILE),
                                              os.path.join(os.path.dirname(root), "config.yaml")]
    for path in candidates:
        if path and os.path.isfile(path):
            with open(path) as f:
                data = yaml.safe_load(f) or {}
            if isinstance(data.get("model"), dict):  # a whole run config
                data = data["model"]
            try:
                return from_dict(ModelConfig, data, "model"), path
            except ConfigError as e:
                raise ConversionError(f"model config {path}", {"unsupported config": [str(e)]}) from e
    raise FileNotFoundError(
        f"no model config for {root}: looked for {' and '.join(c for c in candidates if c)}; pass --model MODEL.yaml")


def _dump_model(model: ModelConfig, path: str) -> None:
    with open(path, "w") as f:
        f.write("# ModelConfig of this checkpoint: train with  model=<this file> train.load=<this folder>\n")
        yaml.safe_dump(dataclasses.asdict(model), f, sort_keys=False)


def _check_output(out: str, overwrite: bool) -> str:
    out = os.path.abspath(out)
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise FileExistsError(f"{out} exists and is not a directory")
        if os.listdir(out) and not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    return out


@contextlib.contextmanager
def _atomic_output(out: str, overwrite: bool) -> Iterator[str]:
    """A temporary sibling folder, renamed to `out` only when the body completes."""
    out = _check_output(out, overwrite)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(out):
        shutil.rmtree(out)
    os.rename(tmp, out)


class _LastTensor:
    """The last computed tensor (the SwiGLU gate and up halves of a layer are two consecutive write
    chunks of one fc1 tensor).  Dropped *before* the next one is computed: one tensor at a time."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, key, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key != self.key:
            self.key, self.value = None, None
            self.value = compute()
            self.key = key
        return self.value


def _region(binding: Binding, chunk: mcore_io.Chunk, full: torch.Tensor) -> torch.Tensor:
    """The piece of one layer's (or an unstacked) tensor that a write chunk covers."""
    offsets, sizes = chunk.offsets, chunk.sizes
    if binding.layer is not None:
        if sizes[0] != 1 or offsets[0] != binding.layer:
            raise RuntimeError(f"write chunk {chunk} spans several layers")
        offsets, sizes = offsets[1:], sizes[1:]
    piece = full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]
    if piece.dtype != chunk.dtype:
        piece = piece.to(chunk.dtype)
    return piece.unsqueeze(0) if binding.layer is not None else piece


class _Progress:
    def __init__(self, what: str, every_s: float = 10.0):
        self.what, self.every_s = what, every_s
        self.start = self.last = time.time()
        self.count = 0
        self.bytes = 0

    def tick(self, tensor: torch.Tensor, label: str) -> None:
        self.count += 1
        self.bytes += tensor.numel() * tensor.element_size()
        now = time.time()
        if now - self.last >= self.every_s:
            self.last = now
            log.info("%s: %d tensors, %.2f GB, %.0f s (at %s)", self.what, self.count, self.bytes / 1e9,
                     now - self.start, label)


# --------------------------------------------------------------------------------------
# Target (megatron) structure


def _vocab_key(bindings: List[Binding]) -> Optional[str]:
    return next((b.key for b in bindings if b.rule.transform is VOCAB_PAD), None)


def _build_target(table: ModelTable, model: ModelConfig, layout: Layout, dtype: torch.dtype, dims: Dims,
                  problems: ProblemList) -> Dict[str, object]:
    """The sharded state dict megatron would save for `model` (weights only) at `layout`, from a
    meta-device build; checks the table against it (keys, shapes, TP axes)."""
    from megatron_omni.parallel.layout import global_named_parameters

    # One process writes every tensor (the checkpoint is layout-free); the target TP enters
    # through the vocabulary padding only.  Local layers: the checkpoint keys are the same as TE's.
    build = dataclasses.replace(model, transformer_impl="local", fp8=None,
                                make_vocab_size_divisible_by=model.make_vocab_size_divisible_by * layout.tp)
    if build.padded_vocab_size(1) != dims.padded_vocab:
        raise AssertionError("vocab padding arithmetic")
    chunks = mcore_io.build_meta_chunks(build, ParallelConfig(), dtype)
    sd = mcore_io.model_sharded_state_dict(chunks, dtype)
    target = {k: s for k, (s, _) in mcore_io.sharded_tensor_shapes(sd).items()}
    expected = table.checkpoint_shapes(model, dims)
    for key, shape in target.items():
        if key not in expected:
            problems.add("target tensors not written", f"{key} {_shape(shape)} (no rule of table {table.name!r})")
    table_shape_problems(problems, target, expected, table.name)
    for chunk in chunks:
        for name, param in global_named_parameters(chunk):
            hit = table.rule_for_param(name)
            if hit is None:
                problems.add("target tensors not written", f"parameter {name} (no rule of table {table.name!r})")
                continue
            axis = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
            if axis != hit[0].tp_axis:
                problems.add("table rules megatron does not have",
                             f"{name}: megatron splits TP on axis {axis}, the table says {hit[0].tp_axis}")
    return sd


def write_iteration(tmp: str, sd: Dict[str, object], provider: mcore_io.Provider, layout: Layout,
                    conversion: Dict[str, object], expected: Dict[str, Tuple[int, ...]]) -> None:
    """megatron save of `sd` (streamed from `provider`) as <tmp>/iter_0000000 + the tracker file, with the
    layout and the conversion provenance in the common state; the written metadata must hold exactly
    the `expected` tensors (key -> global shape)."""
    sd["layout"] = layout.common()
    sd["conversion"] = conversion
    path = os.path.join(tmp, f"iter_{STEP:07d}")
    os.makedirs(path)
    mcore_io.save_streaming(sd, path, provider)
    written = {k: s for k, (s, _) in mcore_io.CheckpointReader(path).tensors.items()}
    if written != {k: tuple(v) for k, v in expected.items()}:
        raise RuntimeError(f"written checkpoint does not hold the planned tensors: "
                           f"{sorted(set(written) ^ set(expected))}")
    with open(os.path.join(tmp, mcore_io.TRACKER_FILE), "w") as f:
        f.write(str(STEP))


def _write_checkpoint(tmp: str, sd: Dict[str, object], provider: mcore_io.Provider, *, table: ModelTable,
                      model: ModelConfig, dims: Dims, layout: Layout, dtype: torch.dtype,
                      source: Dict[str, object]) -> None:
    """megatron save of `sd` (streamed from `provider`) as <tmp>/iter_0000000 + tracker + metadata files,
    then re-read the written metadata and check it holds exactly the table's tensors."""
    conversion = {
        "family": table.name, "source": source, "layout": layout.common() | {"ep": layout.ep},
        "dtype": dtype_name(dtype), "vocab_size": model.vocab_size, "padded_vocab_size": dims.padded_vocab,
        "make_vocab_size_divisible_by": model.make_vocab_size_divisible_by,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    expected = table.checkpoint_shapes(model, dims)
    write_iteration(tmp, sd, provider, layout, conversion, expected)
    _dump_model(model, os.path.join(tmp, MODEL_FILE))
    write_json(os.path.join(tmp, CONVERSION_FILE), conversion)


# --------------------------------------------------------------------------------------
# HF -> megatron


def _hf_input_problems(hf, table: ModelTable, model: ModelConfig, bindings: List[Binding],
                       problems: ProblemList) -> List[str]:
    """Source coverage: every HF tensor is consumed by a rule, checked as a tied copy, or declared dropped;
    every tensor a rule needs exists with the shape the config implies.  Returns notes."""
    notes: List[str] = []
    expected: Dict[str, Tuple[int, ...]] = {}
    for b in bindings:
        expected.update(zip(b.hf_names, b.hf_shapes))
    accounted = set(expected)
    for copy, names in table.tied_copies_for(model):
        for name in names:
            if name in hf.tensors:
                accounted.add(name)
    for drop, names in table.drops_for(model):
        present = [n for n in names if n in hf.tensors]
        accounted.update(present)
        if present:
            notes.append(f"dropped {len(present)} tensor(s) like {present[0]}: {drop.reason}")
    for name in sorted(set(hf.tensors) - accounted):
        info = hf.tensors[name]
        problems.add("source tensors not consumed",
                     f"{name} {_shape(info.shape)} in {os.path.basename(info.path)}")
    for name, shape in expected.items():
        if name not in hf.tensors:
            problems.add("target tensors not written", f"missing source tensor {name} {_shape(shape)} "
                                                       "(the config says the model has it)")
        elif hf.tensors[name].shape != tuple(shape):
            problems.add("shape mismatches", f"{name}: file has {_shape(hf.tensors[name].shape)}, "
                                             f"config.json implies {_shape(shape)}")
    for name in expected:
        if name in hf.tensors and not hf.tensors[name].dtype.is_floating_point:
            problems.add("unsupported dtypes", f"{name}: {hf.tensors[name].dtype}")
    return notes


def _check_tied_copies(hf, table: ModelTable, model: ModelConfig, problems: ProblemList) -> List[str]:
    notes = []
    for copy, names in table.tied_copies_for(model):
        for name in names:
            if name not in hf.tensors or copy.same_as not in hf.tensors:
                continue
            a, b = hf.tensors[name], hf.tensors[copy.same_as]
            if a.shape != b.shape:
                problems.add("shape mismatches", f"{name} {_shape(a.shape)} should be a copy of "
                                                 f"{copy.same_as} {_shape(b.shape)}")
                continue
            ta, tb = hf.read(name), hf.read(copy.same_as)
            same = ta.dtype == tb.dtype and torch.equal(ta, tb)
            del ta, tb
            if not same:
                problems.add("source tensors not consumed", f"{name} differs from {copy.same_as} although "
                                                            "tie_word_embeddings=true (the model would not be tied)")
            else:
                notes.append(f"{name} is an exact copy of {copy.same_as} (tied embeddings): not converted")
    return notes


def hf_to_mcore(hf_dir: str, out: str, *, tp: int = 1, pp: int = 1, vpp: Optional[int] = None, ep: int = 1,
                dtype: Optional[str] = None, make_vocab_size_divisible_by: int = 128,
                overwrite: bool = False) -> Dict[str, object]:
    """HF LlamaForCausalLM folder -> megatron-omni checkpoints root that `train.load=` resumes from; a folder
    `mcore-to-hf` exported from an omni checkpoint -> that omni checkpoint (convert/omni_reimport.py)."""
    from megatron_omni.convert.omni_reimport import is_exported_omni_folder, omni_hf_to_mcore

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


# --------------------------------------------------------------------------------------
# megatron checkpoint as a source


@dataclass
class _Source:
    reader: mcore_io.CheckpointReader
    model: ModelConfig
    table: ModelTable
    dims: Dims
    bindings: List[Binding]
    notes: List[str]


def _open_source(load: str, model_yaml: Optional[str], what: str) -> _Source:
    """Open a megatron checkpoint (inside megatron_world) and check it against its model config and table."""
    root, path = mcore_io.resolve_iteration(load)
    model, model_path = find_model_config(root, model_yaml)
    conversion = {}
    if os.path.isfile(os.path.join(root, CONVERSION_FILE)):
        with open(os.path.join(root, CONVERSION_FILE)) as f:
            conversion = json.load(f)
    table = table_named(conversion.get("family", "llama"))
    reader = mcore_io.CheckpointReader(path)
    problems = ProblemList(f"{what} {path} (model config {model_path})")
    probe = table.bindings(model, Dims.of(model))
    vocab_key = _vocab_key(probe)
    padded = model.padded_vocab_size(1)
    if vocab_key in reader.tensors:
        padded = reader.tensors[vocab_key][0][0]
        saved_tp = (reader.common.get("layout") or {}).get("tp")
        if padded < model.vocab_size:
            problems.add("shape mismatches", f"{vocab_key} has {padded} rows < vocab_size={model.vocab_size}")
        elif saved_tp and padded != model.padded_vocab_size(saved_tp):
            problems.add("shape mismatches", f"{vocab_key} has {padded} rows; vocab_size={model.vocab_size} with "
                                             f"make_vocab_size_divisible_by={model.make_vocab_size_divisible_by} at "
                                             f"tp={saved_tp} pads to {model.padded_vocab_size(saved_tp)}")
    dims = Dims.of(model, padded_vocab=padded)
    bindings = table.bindings(model, dims)
    expected = table.checkpoint_shapes(model, dims)
    present = reader.model_keys()
    for key in present:
        if key not in expected:
            problems.add("source tensors not consumed", f"{key} {_shape(reader.tensors[key][0])}")
    for b in bindings:
        if b.key not in reader.tensors:
            problems.add("target tensors not written",
                         f"{', '.join(b.hf_names)}: checkpoint has no {b.key}")
    for key, shape in expected.items():
        if key in reader.tensors:
            got, dtype = reader.tensors[key]
            if tuple(got) != tuple(shape):
                problems.add("shape mismatches", f"{key}: checkpoint has {_shape(got)}, the model config "
                                                 f"implies {_shape(shape)}")
            if not dtype.is_floating_point:
                problems.add("unsupported dtypes", f"{key}: {dtype}")
    problems.raise_if_any()
    notes = []
    skipped = [k for k in reader.tensors if k not in present]
    if skipped:
        notes.append(f"skipped {len(skipped)} optimizer-state tensors (weights are converted, not optimizer state)")
    if padded != model.vocab_size:
        notes.append(f"dropped vocabulary padding rows {model.vocab_size}..{padded - 1}")
    return _Source(reader=reader, model=model, table=table, dims=dims, bindings=bindings, notes=notes)


def _layer_major_tensors(src: _Source, dtype: torch.dtype, progress: _Progress
                         ) -> Iterator[Tuple[str, torch.Tensor]]:
    """HF tensors in binding order; each layer's megatron tensors are read in one load."""
    bindings = src.bindings
    i = 0
    while i < len(bindings):
        layer = bindings[i].layer
        j = i
        while j < len(bindings) and bindings[j].layer == layer and (layer is not None or j == i):
            j += 1
        group = bindings[i:j]
        loaded = src.reader.read({b.key: (b.key, b.layer) for b in group})
        for b in group:
            hf_tensors = b.rule.transform.to_hf(loaded[b.key], src.dims)
            for name, shape, t in zip(b.hf_names, b.hf_shapes, hf_tensors):
                if tuple(t.shape) != tuple(shape):
                    raise RuntimeError(f"{b.rule.transform.name} gave {_shape(t.shape)} for {name}, expected {_shape(shape)}")
                t = t.to(dtype).contiguous()
                progress.tick(t, name)
                yield name, t
        del loaded
        i = j


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
    from megatron_omni.convert.omni_export import omni_configs, omni_to_hf

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
