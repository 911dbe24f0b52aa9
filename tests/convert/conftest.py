"""Session fixture: the tiny HF Llama models every conversion test starts from."""

from __future__ import annotations

from typing import Dict

import numpy as np
import pytest

from tests.convert.convert_helpers import SPECS, convert, forward, hf_logits, make_hf_llama, report


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


@pytest.fixture(scope="session")
def gqa(hf_models, tmp_path_factory):
    """The GQA model converted for TP2xPP2 (CLI) and its megatron logits at TP2xPP2 (shared by the
    conversion tests and test_generate.py)."""
    m = hf_models["gqa"]
    work = tmp_path_factory.mktemp("gqa")
    ckpt = work / "mcore_tp2pp2"
    rep = report(convert("hf-to-mcore", "--hf-dir", str(m["dir"]), "--out", str(ckpt), "--tp", "2", "--pp", "2"))
    logits = forward(ckpt, m["ids_path"], work / "logits_tp2pp2.npy", tp=2, pp=2)
    return {**m, "work": work, "ckpt": ckpt, "report": rep, "mc_logits": logits}
