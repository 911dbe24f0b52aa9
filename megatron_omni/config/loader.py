"""A run config (`RunConfig`) from YAML, with `section.key=value` command-line overrides.

Composition rule (one rule, used everywhere): wherever a mapping is expected, a
string is read as the path of a YAML file holding that mapping, relative to the
file that names it (or to the working directory on the command line).  So
`model: ../model/llama3_8b.yaml` in a run config and `model=configs/model/llama3_70b.yaml`
on the command line both swap the whole model section.  A `base:` key, at the top
level or inside any section, names a file to start from; the keys beside it are
merged on top (`model: {base: model/llama3_8b.yaml, fp8: hybrid}`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import typing
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from megatron_omni.config.schema import RunConfig
from megatron_omni.config.typed import (  # noqa: F401  (ConfigError, from_dict, load_section_file: public here too)
    ConfigError,
    _deep_merge,
    _read_yaml,
    _resolve_section_files,
    _unknown_key_message,
    _unwrap_optional,
    from_dict,
    load_section_file,
)


# Keys that older runs wrote into their config.yaml and that no longer exist: dropped with a warning
# (not an "unknown config key" error), so a checkpoint's saved config still loads (resume,
# tools/generate.py, conversion).  Value: what to use instead, or why nothing replaces it.
RETIRED_KEYS = {
    ("train", "deterministic"): "it never did anything; model.deterministic_mode is megatron's deterministic mode",
    ("train", "ckpt_format"): "it was never read; checkpoints are torch_dist and a load reads the format from the "
                              "checkpoint",
}


def _drop_retired_keys(data: Dict[str, Any], path: str) -> None:
    for (section, key), instead in RETIRED_KEYS.items():
        node = data.get(section)
        if isinstance(node, dict) and key in node:
            del node[key]
            logging.getLogger("megatron_omni.config").warning("%s: ignoring retired key %s.%s (%s)", path, section,
                                                              key, instead)


def load_yaml_tree(path: str) -> Dict[str, Any]:
    """Read a run config, resolving `base:` and section-file references."""
    data = _read_yaml(path)
    _drop_retired_keys(data, path)
    here = os.path.dirname(os.path.abspath(path))
    base = data.pop("base", None)
    if base is not None:
        data = _deep_merge(load_yaml_tree(os.path.join(here, base)), data)
    return _resolve_section_files(data, here, RunConfig)


def parse_override(text: str) -> Tuple[List[str], Any]:
    """'train.steps=5' -> (['train', 'steps'], 5); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override '{text}': empty key component")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({e})".replace("\n", " ")) from e
    return parts, value


def apply_override(tree: Dict[str, Any], parts: List[str], value: Any, cls: type) -> None:
    """Set a dotted key in the raw tree, validating each component against the schema."""
    node, node_cls, where = tree, cls, ""
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(node_cls)
        names = [f.name for f in dataclasses.fields(node_cls)]
        where = f"{where}.{part}" if where else part
        if part not in names:
            raise ConfigError(_unknown_key_message(where, part, names))
        ftype = _unwrap_optional(hints[part])
        last = i == len(parts) - 1
        if last:
            if dataclasses.is_dataclass(ftype) and isinstance(value, (str, dict)):
                value = _resolve_section_files({part: value}, os.getcwd(), node_cls)[part]
            node[part] = value
            return
        if not dataclasses.is_dataclass(ftype):
            raise ConfigError(f"'{where}' is a value, not a section; cannot set '{'.'.join(parts)}'")
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node, node_cls = child, ftype


def load_config(path: Optional[str], overrides: Sequence[str] = ()):
    """The one way a run's configuration is built: file, then overrides, then types."""
    tree = load_yaml_tree(path) if path else {}
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(tree, parts, value, RunConfig)
    return from_dict(RunConfig, tree)


def to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
