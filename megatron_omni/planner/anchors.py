"""Published Llama-3-70B/8B throughput the planner is checked against.

Two *calibration* anchors fix the only fitted constants (`timing.Efficiency`); the
*held-out* rows were not used for the fit and show how well the model transfers.

Sources:
* Megatron-Bridge performance summary (docs/performance-summary.md of
  NVIDIA-NeMo/Megatron-Bridge, https://docs.nvidia.com/nemo/megatron-bridge/latest/performance-summary.html):
  26.04 container, DGX-H100, LLAMA3_70B FP8 (current scaling), 64 GPUs, GBS 256, MBS 1,
  seq 8192, TP4 PP8 CP1 VP5: 1633 tokens/s/GPU, 734 TFLOP/s/GPU.  25.09 container, same
  layout at GBS 128: 1619 tokens/s/GPU.
* 54 % BF16 MFU for Llama-3.1-70B at TP4/PP4/CP2/VP5 (issue #7).  The cluster and batch of
  that run were not found in a public table; assumed here: Megatron-Bridge's H100 BF16
  preset with that layout (`LLAMA3_70B_PRETRAIN_CONFIG_H100_BF16_V2` in
  scripts/performance/configs/llama/llama3_workload_base_configs.py: 64 H100, GBS 128,
  MBS 1, seq 8192).  54 % of 989 TFLOP/s = 534 TFLOP/s/GPU.
  25.11 container, LLAMA3_8B FP8, 8 GPUs, GBS 128, MBS 1, TP1 PP1 CP1 (with Megatron
  FSDP, which the planner does not model: its memory is not comparable, its speed is):
  14451 tokens/s/GPU, 744 TFLOP/s/GPU.
* NeMo 24.07 performance summary (docs/source/performance/performance_summary.md of
  NVIDIA/NeMo), DGX-H100, FP8: LLAMA3-70B 64 GPUs GBS 128 TP4 PP4 CP2 VP5 -> 1533
  tokens/s/GPU (an older software stack than the calibration rows; that table's TFLOP/s
  count full, not causal, attention, so tokens/s is compared).

The Megatron-Bridge/NeMo recipes reduce gradients in bf16 (`grad_reduce_in_fp32=False`)
and overlap TP communication with TE userbuffers; the anchors are priced with those
settings (`ANCHOR_ASSUMPTIONS`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Optional

import yaml

from megatron_omni.config.loader import from_dict
from megatron_omni.config.schema import ModelConfig
from megatron_omni.planner.cluster import make_cluster
from megatron_omni.planner.layout import Job, Layout, check_layout
from megatron_omni.planner.memory import MemoryAssumptions
from megatron_omni.planner.search import Assumptions, Estimate, evaluate
from megatron_omni.planner.timing import Efficiency

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BRIDGE = "Megatron-Bridge performance summary"

ANCHOR_ASSUMPTIONS = Assumptions(memory=MemoryAssumptions(grad_fp32=False))


@dataclass(frozen=True)
class Anchor:
    name: str
    source: str
    model: str  # configs/model/<model>.yaml
    gpu: str
    gpus: int
    precision: str
    global_batch: int
    seq_len: int
    layout: Layout
    measured_tokens: Optional[float] = None  # tokens/s/GPU
    measured_tflops: Optional[float] = None  # model TFLOP/s/GPU
    measured_mfu: Optional[float] = None
    calibration: bool = False  # used to fit Efficiency
    tolerance: float = 0.10  # relative, on the compared metric

    @property
    def metric(self) -> str:
        return "tokens_per_s_per_gpu" if self.measured_tokens is not None else "mfu"

    @property
    def measured(self) -> float:
        return self.measured_tokens if self.measured_tokens is not None else self.measured_mfu

    def job(self) -> Job:
        return Job(load_model(self.model), self.seq_len, self.global_batch, self.precision)


ANCHORS: List[Anchor] = [
    Anchor(
        "Llama-3-70B FP8, 64xH100, TP4/PP8/VP5, GBS 256", f"{BRIDGE} (26.04, DGX-H100)",
        "llama3_70b", "h100", 64, "fp8", 256, 8192, Layout(tp=4, pp=8, vpp=5),
        measured_tokens=1633, measured_tflops=734, calibration=True,
    ),
    Anchor(
        "Llama-3.1-70B BF16, 64xH100, TP4/PP4/CP2/VP5, GBS 128", "issue #7 (54% MFU); cluster/GBS assumed",
        "llama3_70b", "h100", 64, "bf16", 128, 8192, Layout(tp=4, pp=4, vpp=5, cp=2),
        measured_mfu=0.54, calibration=True,
    ),
    Anchor(
        "Llama-3-70B FP8, 64xH100, TP4/PP8/VP5, GBS 128", f"{BRIDGE} (25.09, DGX-H100)",
        "llama3_70b", "h100", 64, "fp8", 128, 8192, Layout(tp=4, pp=8, vpp=5),
        measured_tokens=1619, measured_tflops=727, tolerance=0.15,
    ),
    Anchor(
        "Llama-3-70B FP8, 64xH100, TP4/PP4/CP2/VP5, GBS 128", "NeMo 24.07 performance summary",
        "llama3_70b", "h100", 64, "fp8", 128, 8192, Layout(tp=4, pp=4, vpp=5, cp=2),
        measured_tokens=1533, tolerance=0.15,
    ),
    Anchor(
        "Llama-3-8B FP8, 8xH100, TP1/PP1/CP1, GBS 128", f"{BRIDGE} (25.11, DGX-H100; ran with FSDP)",
        "llama3_8b", "h100", 8, "fp8", 128, 8192, Layout(),
        measured_tokens=14451, measured_tflops=744, tolerance=0.15,
    ),
]


@lru_cache(maxsize=None)
def load_model(name_or_path: str) -> ModelConfig:
    path = name_or_path if name_or_path.endswith((".yaml", ".yml")) else os.path.join(
        REPO, "configs", "model", f"{name_or_path}.yaml")
    with open(path) as f:
        return from_dict(ModelConfig, yaml.safe_load(f) or {})


def predict(anchor: Anchor, efficiency: Optional[Efficiency] = None) -> Estimate:
    a = ANCHOR_ASSUMPTIONS if efficiency is None else dataclasses.replace(ANCHOR_ASSUMPTIONS, efficiency=efficiency)
    job = anchor.job()
    check_layout(job, anchor.layout, anchor.gpus)
    return evaluate(job, anchor.layout, make_cluster(anchor.gpu, anchor.gpus), a)


def compare(anchor: Anchor, efficiency: Optional[Efficiency] = None) -> Dict:
    est = predict(anchor, efficiency)
    predicted = getattr(est, anchor.metric)
    ratio = predicted / anchor.measured
    return {
        "name": anchor.name,
        "source": anchor.source,
        "calibration": anchor.calibration,
        "metric": anchor.metric,
        "predicted": predicted,
        "measured": anchor.measured,
        "ratio": ratio,
        "within_tolerance": abs(ratio - 1) <= anchor.tolerance,
        "tolerance": anchor.tolerance,
        "predicted_tokens_per_s_per_gpu": est.tokens_per_s_per_gpu,
        "predicted_tflops_per_gpu": est.tflops_per_gpu,
        "predicted_mfu": est.mfu,
        "measured_tflops_per_gpu": anchor.measured_tflops,
        "memory_gib_per_gpu": est.memory.total_gib,
        "fits": est.fits,
    }


def compare_all(efficiency: Optional[Efficiency] = None) -> List[Dict]:
    return [compare(a, efficiency) for a in ANCHORS]


def fitted_efficiency(precision: str, iterations: int = 20) -> float:
    """The efficiency that reproduces the calibration anchor of `precision` exactly (the
    step time is not linear in it because communication is not, so iterate)."""
    anchor = next(a for a in ANCHORS if a.calibration and a.precision == precision)
    eff = Efficiency().of(precision)
    for _ in range(iterations):
        ratio = compare(anchor, dataclasses.replace(Efficiency(), **{precision: eff}))["ratio"]
        eff /= ratio ** 1.0
        if abs(ratio - 1) < 1e-6:
            break
    return eff
