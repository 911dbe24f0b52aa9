"""gradient_accumulation_fusion follows apex's `fused_weight_gradient_mlp_cuda` extension, not the
apex package (issue 18): megatron's own linears raise at construction without the extension."""

import sys
import types
from pathlib import Path

import pytest
import torch

from megatron_omni.config import ParallelConfig
from megatron_omni.config.loader import load_section_file
from megatron_omni.config.schema import ModelConfig
from megatron_omni.models import kernels, llama

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def gpu_machine(monkeypatch):
    """A CUDA machine as far as the kernel choice can tell; apex the package is installed."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "apex", types.ModuleType("apex"))
    kernels.weight_gradient_fusion.cache_clear()
    yield monkeypatch
    kernels.weight_gradient_fusion.cache_clear()


def test_apex_without_its_extension_keeps_fusion_off(gpu_machine, caplog):
    gpu_machine.setitem(sys.modules, "fused_weight_gradient_mlp_cuda", None)  # import raises ImportError
    with caplog.at_level("INFO", logger="megatron_omni.models.kernels"):
        assert kernels.weight_gradient_fusion() is False
    assert "fused_weight_gradient_mlp_cuda" in caplog.text


def test_fusion_on_when_the_extension_imports(gpu_machine):
    extension = "fused_weight_gradient_mlp_cuda"
    gpu_machine.setitem(sys.modules, extension, types.ModuleType(extension))
    assert kernels.weight_gradient_fusion() is True


def test_transformer_config_takes_the_extension_check(monkeypatch):
    monkeypatch.setattr(llama, "weight_gradient_fusion", lambda: False)
    model = load_section_file(ModelConfig, str(REPO / "configs/model/tiny_llm.yaml"))
    # apex (the package) reported present: the old rule switched the fusion on from that alone
    cfg = llama.transformer_config(model, ParallelConfig(), torch.float32,
                                   kernels.Kernels(transformer_engine=False, apex=True, cuda=False))
    assert cfg.gradient_accumulation_fusion is False
