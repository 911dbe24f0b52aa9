"""What the conversions (convert.py, the omni_*.py ones) share.

The checkpoint layout a conversion writes, dtype names, the checked and atomic output folder,
progress lines, the structure megatron builds for the target and the writing of one iteration, the
checks of an HF source, and a megatron checkpoint opened as a source.  The entry points that
dispatch between the Llama and the omni paths are in convert.py, which imports the omni modules;
those import this module, never convert.py (no import cycle).
"""


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
from megatron_omni.convert.hf_folder import write_json
from megatron_omni.convert.mapping import VOCAB_PAD, Binding, Dims, ModelTable
from megatron_omni.convert.registry import table_named

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
