"""A checkpoint folder -> this rank's model chunks ready to generate (any TP/PP/VPP layout).

The configuration comes from the checkpoint: a training run's ``config.yaml`` next to its
``checkpoints/`` (model, omni, tokenizer, LoRA), else the converted checkpoint's ``model.yaml``
bundle (`convert.omni_import.find_omni_config`) with the tokenizer the conversion copied to
``hf_source/``, else an explicit ``--model`` file.  The parallel
layout is the launch's (``parallel.*`` overrides), never the training run's: sharded checkpoints
load at any layout.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import List, Optional, Sequence

import torch

from megatron_omni.config.loader import apply_override, from_dict, load_yaml_tree, parse_override
from megatron_omni.config.schema import RunConfig

__all__ = ["inference_config", "load_inference_model", "real_vocab_size"]

log = logging.getLogger(__name__)


def inference_config(load: str, model_yaml: Optional[str] = None, overrides: Sequence[str] = (),
                     default_precision: Optional[str] = None) -> RunConfig:
    """The RunConfig to build the checkpoint's model with (see module docstring).
    `default_precision` replaces the run's `train.precision` unless an override sets it."""
    from megatron_omni.convert.common import HF_SOURCE
    from megatron_omni.convert.mcore_io import resolve_iteration
    from megatron_omni.convert.omni_import import find_omni_config

    root, _ = resolve_iteration(load)
    run_config = os.path.join(os.path.dirname(root), "config.yaml")
    if model_yaml is None and os.path.isfile(run_config):
        tree = load_yaml_tree(run_config)
        if not isinstance(tree.get("model"), dict):
            tree = None
    else:
        tree = None
    if tree is None:
        model_cfg, omni_cfg = find_omni_config(root, model_yaml)
        tree = {"model": dataclasses.asdict(model_cfg),
                "omni": dataclasses.asdict(omni_cfg) if omni_cfg is not None else None}
        hf_source = os.path.join(root, HF_SOURCE)  # an import's Llama-3 tokenizer (omni-from-hf / hf-to-mcore)
        if os.path.isfile(os.path.join(hf_source, "tokenizer.json")):
            tree["data"] = {"tokenizer_type": "huggingface", "tokenizer_model": hf_source}
    tree["parallel"] = {}  # the launch's layout, not the training run's
    tree.setdefault("train", {})
    if default_precision is not None:
        tree["train"]["precision"] = default_precision
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(tree, parts, value, RunConfig)
    return from_dict(RunConfig, tree)


def real_vocab_size(cfg: RunConfig) -> int:
    """Unpadded LLM vocabulary: the omni vocabulary (text + specials + audio codes) or the Llama one."""
    if cfg.omni is not None:
        from megatron_omni.models.omni import omni_vocab

        return omni_vocab(cfg.model, cfg.omni).size
    return cfg.model.vocab_size


def load_inference_model(cfg: RunConfig, load: str, *, seq_length: int) -> List[torch.nn.Module]:
    """This rank's chunks (Float16Module-wrapped for bf16/fp16), weights from `load`, in eval mode.
    Needs `initialize_distributed(cfg.parallel)` first.  LoRA adapters of the run are rebuilt so an
    alignment-tuning checkpoint loads with them."""
    from megatron.core.transformer.module import Float16Module

    from megatron_omni.models.llama import build_llama_chunks
    from megatron_omni.training.checkpoint import load_checkpoint
    from megatron_omni.training.loop import apply_lora_from_config
    from megatron_omni.training.setup import TrainState, params_dtype

    dtype = params_dtype(cfg.train.precision)
    if cfg.omni is not None:
        from megatron_omni.models.omni import build_omni_chunks

        chunks = build_omni_chunks(cfg.model, cfg.parallel, cfg.omni, seq_length=seq_length, params_dtype=dtype)
    else:
        chunks = build_llama_chunks(cfg.model, cfg.parallel, seq_length=seq_length, params_dtype=dtype)
    if cfg.lora is not None:
        apply_lora_from_config(chunks, cfg)
    for chunk in chunks:
        chunk.cuda(torch.cuda.current_device())
    if load_checkpoint(TrainState(model=chunks, optimizer=None, scheduler=None), load, finetune=True) is None:
        raise FileNotFoundError(f"{load}: no checkpoint found to generate from; pass a run's checkpoints/ folder, "
                                "an iter_XXXXXXX folder or a converted checkpoint")
    model = [Float16Module(c.config, c) if dtype != torch.float32 else c for c in chunks]
    for chunk in model:
        chunk.eval()
    return model
