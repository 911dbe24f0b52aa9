"""Which kernels build the model: Transformer Engine (+ apex) on GPU, megatron-core's local modules otherwise.

Detected once per process; the choice is logged in one line so a run's log always says which path ran.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kernels:
    transformer_engine: bool  # TE layers (fused LayerNorm+Linear, FP8, fused attention, fused RoPE)
    apex: bool  # the apex package (fused optimizers); its CUDA extensions are checked one by one below
    cuda: bool

    @property
    def description(self) -> str:
        if self.transformer_engine:
            return "Transformer Engine layers" + (" + apex" if self.apex else "") + " on CUDA"
        where = "CUDA" if self.cuda else "CPU (CUDA emulated)"
        return f"megatron-core local layers (no Transformer Engine) on {where}"


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def detect_kernels(transformer_impl: str = "auto") -> Kernels:
    """Resolve `model.transformer_impl` (auto | transformer_engine | local) against what is installed."""
    cuda = torch.cuda.is_available()
    have_te = cuda and _importable("transformer_engine")
    if transformer_impl == "transformer_engine" and not have_te:
        raise RuntimeError(
            "model.transformer_impl=transformer_engine but Transformer Engine is not usable here "
            f"(CUDA available: {cuda}); install transformer-engine[pytorch] or use model.transformer_impl=auto"
        )
    use_te = have_te and transformer_impl != "local"
    kernels = Kernels(transformer_engine=use_te, apex=cuda and _importable("apex"), cuda=cuda)
    log.info("kernels: %s", kernels.description)
    return kernels


@functools.lru_cache(maxsize=None)
def megatron_softmax_kernels() -> bool:
    """apex's fused softmax extensions, which megatron's `FusedScaleMaskSoftmax` imports (without a
    fallback) for fp16/bf16 scores with sk <= 4096 when `masked_softmax_fusion` is on."""
    return all(_importable(n) for n in (
        "scaled_upper_triang_masked_softmax_cuda", "scaled_masked_softmax_cuda", "scaled_softmax_cuda"))


def _imports(name: str) -> bool:
    """The module really imports (a compiled extension can be found yet fail to load)."""
    try:
        importlib.import_module(name)
        return True
    except Exception:  # ImportError, OSError/undefined symbols of a mismatched build
        return False


@functools.lru_cache(maxsize=None)
def weight_gradient_fusion() -> bool:
    """`gradient_accumulation_fusion`: megatron's own linears (the output layer, every layer of the
    local spec) raise at construction unless apex's `fused_weight_gradient_mlp_cuda` extension
    imports -- the apex package alone (pip install apex without its CUDA extensions) is not enough."""
    ok = torch.cuda.is_available() and _imports("fused_weight_gradient_mlp_cuda")
    if not ok and torch.cuda.is_available():
        log.info("gradient_accumulation_fusion off: apex's fused_weight_gradient_mlp_cuda extension does not "
                 "import (build apex with --cuda_ext to get it)")
    return ok
