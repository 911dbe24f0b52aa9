"""Files shipped into an exported Hugging Face omni folder (`mcore-to-hf` on an omni checkpoint).

`configuration_megatron_omni.py`, `modeling_megatron_omni.py` and `processing_megatron_omni.py` are copied
verbatim into the folder (config.json's / processor_config.json's `auto_map` name them), so they import
transformers, torch (and numpy / PIL for the processor) only -- never megatron_omni:
`AutoModelForCausalLM` / `AutoProcessor.from_pretrained(folder, trust_remote_code=True)` must work with
transformers alone.
"""

import os

HF_DIR = os.path.dirname(os.path.abspath(__file__))
REMOTE_CODE_FILES = ("configuration_megatron_omni.py", "modeling_megatron_omni.py", "processing_megatron_omni.py")
