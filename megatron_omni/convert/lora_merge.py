"""Export of a LoRA checkpoint (the alignment-tuning stage, models/lora.py): the adapters are folded
into their base weights, W + (alpha/r) B A, as `models.lora.merge_lora` does on a live model.

The adapters are stored like their base weights (stacked over layers, TP-sharded on the same axis;
fc1's B with megatron's SwiGLU factory, so its global rows are [gate; up] like fc1's weight), so the
merge is done on the global tensors the reader returns, one layer at a time: the exported folder is
a plain model with no adapter in it.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch
import yaml

from megatron_omni.convert.mcore_io import CheckpointReader

LORA_A, LORA_B = ".lora.lora_A", ".lora.lora_B"


def lora_alpha(root: str) -> Optional[float]:
    """lora.alpha of the training run whose checkpoints root is `root` (None: alpha = rank, scale 1)."""
    path = os.path.join(os.path.dirname(os.path.normpath(root)), "config.yaml")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        lora = (yaml.safe_load(f) or {}).get("lora")
    return lora.get("alpha") if isinstance(lora, dict) else None


class LoRAMergedReader(CheckpointReader):
    """A CheckpointReader whose adapted base weights come back with (alpha/r) B A added, and whose
    model keys leave the adapters out (they are consumed by the merge)."""

    def __init__(self, load: str, alpha: Optional[float] = None):
        super().__init__(load)
        self.alpha = alpha
        self.adapters: Dict[str, Tuple[str, str]] = {}
        for key in super().model_keys():
            if key.endswith(LORA_A):
                base = key[: -len(LORA_A)] + ".weight"
                if base not in self.tensors or key[: -len(LORA_A)] + LORA_B not in self.tensors:
                    raise ValueError(f"{self.path}: LoRA adapter {key} has no base weight {base} or no B factor")
                self.adapters[base] = (key, key[: -len(LORA_A)] + LORA_B)

    def model_keys(self):
        return [k for k in super().model_keys() if LORA_A not in k and LORA_B not in k]

    def read(self, requests):
        out = super().read(requests)
        for name, (key, layer) in requests.items():
            if key not in self.adapters:
                continue
            a_key, b_key = self.adapters[key]
            ab = super().read({"a": (a_key, layer), "b": (b_key, layer)})
            a, b = ab["a"].float(), ab["b"].float()
            rank = a.shape[-2]
            scale = (self.alpha if self.alpha is not None else rank) / rank
            out[name] = (out[name].float() + scale * torch.matmul(b, a)).to(out[name].dtype)
        return out


def open_checkpoint_reader(load: str) -> CheckpointReader:
    """The checkpoint's reader: adapters (if any) merged into their base weights."""
    reader = CheckpointReader(load)
    if not any(k.endswith(LORA_A) for k in reader.model_keys()):
        return reader
    return LoRAMergedReader(load, lora_alpha(reader.root))
