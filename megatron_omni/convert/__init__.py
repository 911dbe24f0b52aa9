"""Hugging Face <-> megatron-omni checkpoint conversion.

    from megatron_omni.convert import hf_to_mcore, mcore_to_hf, reshard
    hf_to_mcore("Llama-3.2-1B", "ckpt/llama32_1b", tp=2, pp=2)      # then: train.load=ckpt/llama32_1b
    mcore_to_hf("runs/x/checkpoints", "release/x", tokenizer_dir="Llama-3.2-1B")
    reshard("runs/x/checkpoints", "ckpt/x_tp1", tp=1, pp=1)

The mapping is declarative (`mapping.py`; one table per family, `llama.py`; registry in
`registry.py`); conversions stream tensor by tensor and refuse, listing every problem,
before writing anything (`convert.py`; what every conversion shares, `common.py`).  CLI: tools/convert_checkpoint.py.
"""

from megatron_omni.convert.common import Layout, find_model_config
from megatron_omni.convert.convert import hf_to_mcore, mcore_to_hf, reshard
from megatron_omni.convert.errors import ConversionError
from megatron_omni.convert.mapping import Dims, ModelTable, Rule
from megatron_omni.convert.registry import TABLES, register, table_for_hf_config, table_named

__all__ = [
    "ConversionError", "Dims", "Layout", "ModelTable", "Rule", "TABLES", "find_model_config", "hf_to_mcore",
    "mcore_to_hf", "register", "reshard", "table_for_hf_config", "table_named",
]
