"""An exported omni HF folder (convert/omni_export.py) -> omni checkpoint again (`hf-to-mcore` on it).

The inverse of the export, through the same name tables (convert/llama.py for the LLM with the omni
vocabulary, convert/omni_mapping.py for the encoders; our names below `audio_connector.` /
`audio_tower.cmvn.`), so megatron -> HF -> megatron is bit-identical.  The model config is the bundle the
export stored in config.json (`megatron_omni_bundle`), checked against the folder's tensors; every
tensor of the folder is consumed and every tensor of the model written, or nothing is.  Streams one
tensor at a time into megatron's torch_dist format (omni_import.write_omni_checkpoint).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Dict, Optional, Tuple

import torch

from megatron_omni.config.loader import ConfigError, from_dict
from megatron_omni.config.schema import ModelConfig, OmniConfig
from megatron_omni.convert import mcore_io
from megatron_omni.convert.common import (
    Layout,
    _atomic_output,
    _check_output,
    _Progress,
    _shape,
    dtype_name,
    parse_dtype,
)
from megatron_omni.convert.errors import ConversionError, ProblemList
from megatron_omni.convert.hf_folder import open_hf_folder
from megatron_omni.convert.llama import LLAMA
from megatron_omni.convert.mapping import Dims, LazyTensor
from megatron_omni.convert.omni_export import AUDIO_PREFIX, UNSOURCED_NAMES, VISION_PREFIX
from megatron_omni.convert.omni_hf_config import BUNDLE_KEY, MODEL_TYPE
from megatron_omni.convert.omni_import import _omni_target, layout_problems, write_omni_checkpoint
from megatron_omni.convert.omni_mapping import audio_table, vision_table
from megatron_omni.models.omni_vocab import OmniVocab

Producer = Callable[[torch.dtype], torch.Tensor]


def is_exported_omni_folder(hf_dir: str) -> bool:
    import json

    try:
        with open(os.path.join(hf_dir, "config.json")) as f:
            return json.load(f).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


def omni_hf_to_mcore(hf_dir: str, out: str, *, tp: int = 1, pp: int = 1, vpp: Optional[int] = None,
                     first_stage_num_layers: Optional[int] = None, dtype: Optional[str] = None,
                     overwrite: bool = False) -> Dict[str, object]:
    started = time.time()
    _check_output(out, overwrite)
    hf = open_hf_folder(hf_dir)
    problems = ProblemList(f"hf-to-mcore {hf_dir} (exported omni folder)")
    bundle = hf.config.get(BUNDLE_KEY)
    if not isinstance(bundle, dict):
        problems.add("unsupported config", f"config.json has no {BUNDLE_KEY} (not written by megatron-omni's export)")
        problems.raise_if_any()
    try:
        model = from_dict(ModelConfig, bundle["model"], "model")
        omni = from_dict(OmniConfig, bundle["omni"], "omni")
    except (ConfigError, KeyError) as e:
        raise ConversionError(f"hf-to-mcore {hf_dir}", {"unsupported config": [str(e)]}) from e
    layout = Layout(tp=tp, pp=pp, vpp=vpp)
    problems.extend("invalid layout", layout_problems(layout, model, first_stage_num_layers))
    problems.raise_if_any()
    vocab = OmniVocab(model.vocab_size, omni.audio_codebook_size)
    model_v = dataclasses.replace(model, vocab_size=vocab.size)
    padded = model.padded_vocab_size(tp, vocab.size)
    dims = Dims.of(model_v, padded_vocab=padded)
    plan: Dict[Tuple[str, Optional[int]], Producer] = {}
    wanted: Dict[str, Tuple[int, ...]] = {}

    def lazy(n):
        return LazyTensor(hf.tensors[n].shape, load=lambda dt: hf.read(n, dt), load_into=lambda t: hf.read_into(n, t))

    for b in LLAMA.bindings(model_v, dims):
        wanted.update(zip(b.hf_names, b.hf_shapes))
        if all(n in hf.tensors for n in b.hf_names):
            plan[(b.key, b.layer)] = (lambda b=b: lambda dt: b.rule.transform.to_mcore_lazy(
                [lazy(n) for n in b.hf_names], dims, dt))()
    tables = [(VISION_PREFIX, vision_table(omni.vision))] if omni.vision is not None else []
    tables += [(AUDIO_PREFIX, audio_table(omni.audio))] if omni.audio is not None else []
    encoder_bindings = []
    for prefix, table in tables:
        for b in table.bindings():
            names = [prefix + n for n in b.source]
            wanted.update({n: None for n in names})
            encoder_bindings.append((b, names))
            if all(n in hf.tensors for n in names):
                plan[(b.key, b.index)] = (lambda b=b, names=names: lambda dt: b.to_ours(
                    [hf.read(n, dt) for n in names]))()
    for name in hf.tensors:
        ours = next((p for p, folder in UNSOURCED_NAMES.items() if name.startswith(folder)), None)
        if ours is not None:
            key = ours + name[len(UNSOURCED_NAMES[ours]):]
            wanted[name] = None
            plan[(key, None)] = lambda dt, name=name: hf.read(name, dt)
    for name in sorted(set(hf.tensors) - set(wanted)):
        problems.add("source tensors not consumed", f"{name} {_shape(hf.tensors[name].shape)}")
    for name, shape in wanted.items():
        if name not in hf.tensors:
            problems.add("target tensors not written", f"missing source tensor {name}")
        elif shape is not None and tuple(hf.tensors[name].shape) != tuple(shape):
            problems.add("shape mismatches", f"{name}: file has {_shape(hf.tensors[name].shape)}, the bundle "
                                             f"implies {_shape(shape)}")
    problems.raise_if_any()
    out_dtype = parse_dtype(dtype) or hf.tensors["model.embed_tokens.weight"].dtype
    progress = _Progress("hf-to-mcore (omni)")
    with mcore_io.megatron_world():
        sd, target = _omni_target(model, omni, layout, out_dtype)
        for key in sorted(set(target) - {k for k, _ in plan}):
            problems.add("target tensors not written", f"{key} {_shape(target[key])}")
        for key in sorted({k for k, _ in plan} - set(target)):
            problems.add("source tensors not consumed", f"{key}: the model has no such tensor")
        problems.raise_if_any()
        conversion = {"family": "omni", "source": {"kind": "hf_omni", "path": os.path.abspath(hf_dir)},
                      "layout": layout.common(), "first_stage_num_layers": first_stage_num_layers,
                      "dtype": dtype_name(out_dtype), "vocab_size": model.vocab_size, "omni_vocab_size": vocab.size,
                      "padded_vocab_size": padded, "make_vocab_size_divisible_by": model.make_vocab_size_divisible_by,
                      "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with _atomic_output(out, overwrite) as tmp:
            write_omni_checkpoint(tmp, sd, target, plan, layout=layout, conversion=conversion, progress=progress,
                                  model=model, omni=omni, sources={"hf_omni": os.path.abspath(hf_dir)})
    hf.close()
    return {"out": os.path.abspath(out), "tensors": progress.count, "bytes": progress.bytes,
            "dtype": dtype_name(out_dtype), "layout": layout.common(), "vocab": vocab.size, "padded_vocab": padded,
            "seconds": round(time.time() - started, 1)}
