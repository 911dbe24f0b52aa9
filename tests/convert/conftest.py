"""Session fixtures: the tiny HF Llama models every conversion test starts from, and the exported omni folder
of a TP2 x PP2 tiny omni training run with megatron's reference outputs (test_omni_export*.py share it)."""

from __future__ import annotations

from typing import Dict

import numpy as np
import pytest
import torch

from tests.convert.convert_helpers import SPECS, convert, forward, hf_logits, make_hf_llama, report
from tests.convert.omni_export_helpers import GREEDY_STEPS, megatron_greedy, megatron_logits, megatron_model, \
    mixed_sample, omni_run, run_configs


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
def exported(tmp_path_factory):
    """A tiny omni run's checkpoint exported (omni folder + --language-model-only folder), a mixed sample and
    megatron's logits / greedy tokens / encoder tensors on it."""
    from megatron_omni.convert import mcore_to_hf
    from megatron_omni.convert.mcore_io import megatron_world

    root = tmp_path_factory.mktemp("omni_export")
    ckpt = omni_run(root)
    reports = {"omni": mcore_to_hf(str(ckpt), str(root / "hf")),
               "llm": mcore_to_hf(str(ckpt), str(root / "hf_llm"), language_model_only=True)}
    model_cfg, omni = run_configs(ckpt)
    sample = mixed_sample(model_cfg, omni)
    text_ids = torch.randint(0, model_cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    with megatron_world():
        model = megatron_model(ckpt, sample["input_ids"].shape[1] + GREEDY_STEPS)
        text = {"input_ids": text_ids, "position_ids": torch.arange(24).expand(3, 2, 24)}
        for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "audio_features",
                  "audio_lengths"):
            text[k] = None
        ref = {"logits": megatron_logits(model, sample),
               "greedy": megatron_greedy(model, sample, model.vocab, GREEDY_STEPS),
               "text_logits": megatron_logits(model, text), "text_ids": text_ids, "vocab": model.vocab,
               "vision": {k: v.clone() for k, v in model.vision.state_dict().items() if isinstance(v, torch.Tensor)},
               "audio": {k: v.clone() for k, v in model.audio.state_dict().items() if isinstance(v, torch.Tensor)}}
    yield {"root": root, "ckpt": ckpt, "reports": reports, "sample": sample, "ref": ref, "omni": omni}


@pytest.fixture(scope="session")
def hf_model(exported):
    """The exported omni folder in transformers (remote code), fp32, and its loading info."""
    transformers = pytest.importorskip("transformers")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        exported["root"] / "hf", trust_remote_code=True, dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


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
