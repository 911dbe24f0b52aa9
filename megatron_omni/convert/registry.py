"""Model families the converter knows.  Adding a model = writing its table and registering it here."""

from __future__ import annotations

from typing import Any, Dict, List

from megatron_omni.convert.errors import ConversionError
from megatron_omni.convert.llama import LLAMA
from megatron_omni.convert.mapping import ModelTable
from megatron_omni.convert.moe import QWEN2_MOE_TABLE

TABLES: Dict[str, ModelTable] = {}


def register(table: ModelTable) -> ModelTable:
    if table.name in TABLES:
        raise ValueError(f"model table {table.name!r} registered twice")
    TABLES[table.name] = table
    return table


register(LLAMA)
register(QWEN2_MOE_TABLE)


def table_named(name: str) -> ModelTable:
    if name not in TABLES:
        raise ConversionError("model family", {"unsupported config": [f"{name!r}; known: {sorted(TABLES)}"]})
    return TABLES[name]


def table_for_hf_config(cfg: Dict[str, Any]) -> ModelTable:
    """The table whose architectures (or, without `architectures`, model_type) match an HF config.json."""
    archs: List[str] = list(cfg.get("architectures") or [])
    for table in TABLES.values():
        if any(a in table.hf_architectures for a in archs):
            return table
    if not archs:
        for table in TABLES.values():
            if cfg.get("model_type") in table.hf_model_types:
                return table
    known = sorted(a for t in TABLES.values() for a in t.hf_architectures)
    raise ConversionError("HF config.json", {"unsupported config": [
        f"architectures={archs} model_type={cfg.get('model_type')!r}: no conversion table (known: {known})"]})
