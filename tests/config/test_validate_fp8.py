"""`validate` refuses model.fp8_recipe=mxfp8 off Blackwell (issue 18): Hopper cannot run it."""

import pytest
import torch

from megatron_omni.config import ConfigError, load_config, validate

FP8 = ["model.fp8=hybrid", "model.transformer_impl=transformer_engine"]


def _gpu(monkeypatch, capability, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)


def test_mxfp8_on_hopper_is_refused_naming_the_fix(monkeypatch):
    _gpu(monkeypatch, (9, 0), "NVIDIA H100 80GB HBM3")
    cfg = load_config("configs/tiny/llm.yaml", [*FP8, "model.fp8_recipe=mxfp8"])
    with pytest.raises(ConfigError, match=r"mxfp8 needs a Blackwell GPU .* this one is 9\.0 \(NVIDIA H100.*tensorwise"):
        validate(cfg, 1)
    validate(load_config("configs/tiny/llm.yaml", [*FP8, "model.fp8_recipe=tensorwise"]), 1)  # Hopper FP8 is fine


def test_mxfp8_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="mxfp8 needs a Blackwell GPU .* none is visible"):
        validate(load_config("configs/tiny/llm.yaml", [*FP8, "model.fp8_recipe=mxfp8"]), 1)


def test_mxfp8_on_blackwell_passes(monkeypatch):
    _gpu(monkeypatch, (10, 0), "NVIDIA B200")
    validate(load_config("configs/tiny/llm.yaml", [*FP8, "model.fp8_recipe=mxfp8"]), 1)
