"""What a plan prices, read from a config file: a bare model config, an omni model bundle
(`model` + `omni`), or a stage / run config, whose sequence length, global batch, precision,
frozen modules, LoRA, modality plan and Table 2 media limits become the defaults (arguments win)."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from megatron_omni.config.loader import ConfigError, load_config, load_yaml_tree
from megatron_omni.planner import anchors
from megatron_omni.planner.layout import Job
from megatron_omni.planner.omni import MediaAssumptions, workload_from_config

DEFAULT_SEQ_LEN = 8192


def load_job(path: str, overrides: Sequence[str] = (), *, seq_len: Optional[int] = None,
             global_batch: Optional[int] = None, precision: Optional[str] = None,
             media: Optional[MediaAssumptions] = None) -> Job:
    tree = load_yaml_tree(path)
    if "model" not in tree:  # a bare ModelConfig file
        if overrides:
            raise ConfigError(f"{path}: overrides need a run config or model bundle (a file with a `model:` section)")
        return Job(anchors.load_model(path), seq_len or DEFAULT_SEQ_LEN, _required(global_batch, path),
                   precision or "bf16")
    cfg = load_config(path, overrides)
    is_run = "train" in tree  # a stage: its batch and sequence are the defaults
    model = cfg.model
    if cfg.omni is not None:  # the LLM's vocabulary is the text ids + omni specials + speech codes
        from megatron_omni.models.omni import omni_vocab

        model = dataclasses.replace(model, vocab_size=omni_vocab(model, cfg.omni).size)
    return Job(
        model,
        seq_len or (cfg.data.seq_length if is_run else DEFAULT_SEQ_LEN),
        _required(global_batch or (cfg.train.global_batch_size if is_run else None), path),
        precision or ("fp8" if cfg.model.fp8 else "bf16"),
        omni=workload_from_config(cfg, media, source=path) if cfg.omni is not None else None,
    )


def _required(global_batch: Optional[int], path: str) -> int:
    if global_batch is None:
        raise ConfigError(f"{path} has no train.global_batch_size: give --global-batch (sequences per step)")
    return global_batch
