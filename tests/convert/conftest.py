"""Session fixture: the tiny HF Llama models every conversion test starts from."""

from __future__ import annotations

from typing import Dict

import numpy as np
import pytest

from tests.convert.convert_helpers import SPECS, hf_logits, make_hf_llama


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> Dict[str, dict]:
    """name -> {"dir", "ids" (int64 [2, 32]), "ids_path", "logits" (transformers fp32)}."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, (name, spec) in enumerate(SPECS.items()):
        path = make_hf_llama(root / name, seed=i, **spec)
        ids = np.random.default_rng(i).integers(0, spec["vocab_size"], size=(2, 32), dtype=np.int64)
        if name == "mqa":
            assert (path / "model.safetensors").is_file() and not (path / "model.safetensors.index.json").exists()
        ids_path = root / f"{name}_ids.npy"
        np.save(ids_path, ids)
        out[name] = {"dir": path, "ids": ids, "ids_path": ids_path, "logits": hf_logits(path, ids)}
    return out
