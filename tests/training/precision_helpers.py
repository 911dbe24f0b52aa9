"""Shared checks of the bf16/fp16-vs-fp32 tests: run tests/helpers/precision_step.py and compare.

Tolerances (the tiny omni model, same seed and microbatches; measured values in
/work/notes/issue-18.md "session 22"): bf16 keeps 8 mantissa bits (unit roundoff 2^-8 = 3.9e-3)
but the loss is a mean over hundreds of tokens computed in fp32 from bf16 logits, so losses agree
to ~1e-4 relative; the gradient of a module (relative L2 distance over its tensors) to ~1%.
fp16 keeps 11 bits: tighter.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence

import torch

from tests.helpers.launch import torchrun

SMALL = ["data.seq_length=96", "train.micro_batch_size=1", "train.log_interval=1"]
LOSS_RTOL = {"bf16": 2e-3, "fp16": 5e-4}
GRAD_RTOL = {"bf16": 5e-2, "fp16": 1e-2}
DTYPES = {"bf16": "torch.bfloat16", "fp16": "torch.float16", "fp32": "torch.float32"}


def run_precisions(nproc: int, path, config: str, overrides: Sequence[str], precisions=("fp32", "bf16"),
                   steps: int = 2) -> Dict[str, dict]:
    torchrun(nproc, ["tests/helpers/precision_step.py", str(path), "--config", config, "--precisions",
                     ",".join(precisions), "--steps", str(steps), *SMALL, f"train.output_dir={path.parent}",
                     *overrides], timeout=300)
    return torch.load(path)


def module_grad_rel_diff(ref: Dict[str, torch.Tensor], got: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Relative L2 distance of the gradient per module (first two name parts, e.g. 'audio.decoder')."""
    assert set(got) == set(ref) and ref
    num: Dict[str, float] = {}
    den: Dict[str, float] = {}
    for name, g in ref.items():
        assert torch.isfinite(got[name]).all(), name
        key = ".".join(name.split(".")[:2])
        num[key] = num.get(key, 0.0) + (got[name] - g).double().norm().item() ** 2
        den[key] = den.get(key, 0.0) + g.double().norm().item() ** 2
    return {k: math.sqrt(num[k] / max(den[k], 1e-30)) for k in num}


def assert_matches_fp32(results: Dict[str, dict], precision: str, *, rows: int = None) -> Dict[str, float]:
    """Loss, per-modality losses (and DPO loss) of every step within LOSS_RTOL, step 1's gradient
    of every module within GRAD_RTOL, bf16/fp16 model weights with fp32 main parameters."""
    ref, got = results["fp32"], results[precision]
    assert got["param_dtypes"] == [DTYPES[precision]], (got["param_dtypes"], got["fp32_params"])
    assert got["main_param_dtypes"] == ["torch.float32"], got["main_param_dtypes"]
    tol = LOSS_RTOL[precision]
    for a, b in list(zip(ref["rows"], got["rows"]))[:rows]:
        assert b["update_successful"] and math.isfinite(b["grad_norm"])
        assert abs(b["loss"] - a["loss"]) <= tol * abs(a["loss"]), (a["loss"], b["loss"])
        for m, loss in a["losses"].items():
            assert abs(b["losses"][m] - loss) <= tol * abs(loss), (m, loss, b["losses"][m])
        assert abs(b["grad_norm"] - a["grad_norm"]) <= 10 * tol * a["grad_norm"]
    diffs = module_grad_rel_diff(ref["grads"], got["grads"])
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= GRAD_RTOL[precision], (worst, diffs)
    return diffs
