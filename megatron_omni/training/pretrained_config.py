"""A run starting from a converted omni checkpoint (`omni-from-hf`, or `hf-to-mcore` of an exported omni
folder) must build the architecture that checkpoint was converted for.

dist_checkpointing only catches shape differences; a RoPE base, norm epsilon, activation, M-RoPE split,
audio front end or LLM width of a run config that disagrees with the converted weights would train
silently on wrong numerics.  So the run's `model` / `omni` sections are compared with the checkpoint's
`model.yaml` (what the HF configs said), field by field; the knobs that do not change what the weights
mean (kernels, recompute, dropout, init, vocabulary padding, which modules are frozen) may differ.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, List, Optional

from megatron_omni.config.loader import ConfigError
from megatron_omni.config.schema import ModelConfig, OmniConfig, RunConfig

# Fields a stage may set freely on top of the converted architecture.
TRAINING_KNOBS = frozenset({
    "transformer_impl", "fp8", "fp8_recipe", "fp8_amax_history_len", "fp8_amax_compute_algo",
    "recompute_granularity", "recompute_method", "recompute_num_layers", "recompute", "attention_dropout",
    "hidden_dropout", "init_method_std", "make_vocab_size_divisible_by", "max_position_embeddings", "freeze",
    "deterministic_mode",
})


def _differences(ours: Any, theirs: Any, where: str) -> List[str]:
    if isinstance(ours, dict) and isinstance(theirs, dict):
        out = []
        for key in sorted(set(ours) | set(theirs)):
            if key not in TRAINING_KNOBS:
                out += _differences(ours.get(key), theirs.get(key), f"{where}.{key}")
        return out
    return [] if ours == theirs else [f"{where}={json.dumps(theirs)} (run: {json.dumps(ours)})"]


def architecture_differences(run_model: ModelConfig, run_omni: Optional[OmniConfig], model: ModelConfig,
                             omni: Optional[OmniConfig]) -> List[str]:
    """`section.key=<converted value> (run: <run value>)` for every architecture field that differs."""
    out = _differences(dataclasses.asdict(run_model), dataclasses.asdict(model), "model")
    return out + _differences(dataclasses.asdict(run_omni) if run_omni else None,
                              dataclasses.asdict(omni) if omni else None, "omni")


def check_converted_architecture(cfg: RunConfig, root: str) -> None:
    """ConfigError naming every architecture field in which `cfg` differs from the converted omni
    checkpoint at `root` (a checkpoints root holding model.yaml); nothing to check for other checkpoints."""
    from megatron_omni.convert.common import MODEL_FILE
    from megatron_omni.convert.omni_import import LLM_FILE, OMNI_FILE, find_omni_config

    if os.path.basename(os.path.normpath(root)).startswith("iter_"):
        root = os.path.dirname(os.path.normpath(root))
    if cfg.omni is None or not os.path.isfile(os.path.join(root, MODEL_FILE)):
        return
    model, omni = find_omni_config(root)
    if omni is None:
        return  # an LLM-only conversion: the checkpoint loader names what the omni run misses
    diffs = architecture_differences(cfg.model, cfg.omni, model, omni)
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; ... {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise ConfigError(
            f"train.pretrained_checkpoint={root} was converted for another architecture: {shown}.  Train the "
            f"converted one: pass those checkpoint values as overrides (section.key=value, to every stage of a "
            f"chain), or model={os.path.join(root, LLM_FILE)} omni={os.path.join(root, OMNI_FILE)} (then the "
            f"stage's omni.freeze=[...] again)")
