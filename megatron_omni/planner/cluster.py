"""GPU and interconnect specs the planner prices memory and communication with.

Sources (vendor datasheets; "GB" = 1e9 bytes, converted to GiB where memory is compared):

* H100 SXM5 80GB: 80 GB HBM3 (nvidia-smi reports 81559 MiB = 79.6 GiB), 3.35 TB/s,
  NVLink 4 900 GB/s per GPU bidirectional (450 GB/s each way).  DGX H100: 8 GPUs per
  node on NVSwitch, 8x ConnectX-7 400 Gb/s InfiniBand (one 50 GB/s NIC per GPU).
* H200 SXM 141GB: 141 GB HBM3e (nvidia-smi 143771 MiB = 140.4 GiB), 4.8 TB/s, same
  NVLink 4 (900 GB/s) and same Hopper tensor cores as H100 (so the same peaks).
  DGX H200: 8 GPUs, 8x 400 Gb/s ConnectX-7.
* A100 SXM4 80GB: 80 GB HBM2e (81920 MiB = 80.0 GiB), 2.0 TB/s, NVLink 3 600 GB/s
  bidirectional (300 GB/s each way).  DGX A100: 8 GPUs, 8x 200 Gb/s HDR InfiniBand.

Dense tensor-core peaks come from `megatron_omni.training.flops.PEAK_TFLOPS` (one table
for the whole codebase).  Collectives never reach the link rate: NCCL's bus bandwidth on
a DGX node is ~80 % of the per-direction NVLink rate and ~80-90 % of the NIC rate
(nccl-tests all_reduce_perf), which `link_efficiency` applies to both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from megatron_omni.training.flops import PEAK_TFLOPS

GIB = 1024**3


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_gib: float  # what the framework can allocate into (nvidia-smi total)
    hbm_tb_s: float  # HBM bandwidth, TB/s (optimizer step is bandwidth bound)
    nvlink_gb_s: float  # per GPU, one direction, GB/s
    ib_gb_s: float  # scale-out NIC per GPU, one direction, GB/s (400 Gb/s = 50 GB/s)
    gpus_per_node: int = 8  # NVLink/NVSwitch domain

    def peak_tflops(self, precision: str) -> float:
        table = PEAK_TFLOPS.get(self.name) or {}
        peak = table.get(precision)
        if not peak:
            raise ValueError(f"no {precision} peak for {self.name} in flops.PEAK_TFLOPS")
        return peak


GPUS: Dict[str, GPUSpec] = {
    "h100": GPUSpec("h100", memory_gib=79.6, hbm_tb_s=3.35, nvlink_gb_s=450.0, ib_gb_s=50.0),
    "h200": GPUSpec("h200", memory_gib=140.4, hbm_tb_s=4.8, nvlink_gb_s=450.0, ib_gb_s=50.0),
    "a100": GPUSpec("a100", memory_gib=80.0, hbm_tb_s=2.0, nvlink_gb_s=300.0, ib_gb_s=25.0),
}


@dataclass(frozen=True)
class Cluster:
    """`num_gpus` GPUs of one kind, `gpus_per_node` of them behind one NVSwitch."""

    gpu: GPUSpec
    num_gpus: int
    gpus_per_node: int = 8
    link_efficiency: float = 0.8  # achieved bus bandwidth / link rate for NCCL collectives

    @property
    def nodes(self) -> int:
        return -(-self.num_gpus // self.gpus_per_node)

    def bandwidth_gb_s(self, group_span: int) -> float:
        """Achievable per-GPU bandwidth of a collective whose ranks span `group_span`
        consecutive global ranks: NVLink inside a node, the NIC once it leaves it."""
        raw = self.gpu.nvlink_gb_s if group_span <= self.gpus_per_node else self.gpu.ib_gb_s
        return raw * self.link_efficiency


def make_cluster(
    gpu: str, num_gpus: int, gpus_per_node: Optional[int] = None, ib_gb_s: Optional[float] = None
) -> Cluster:
    key = gpu.lower()
    if key not in GPUS:
        raise ValueError(f"unknown GPU '{gpu}'; known: {', '.join(sorted(GPUS))}")
    if num_gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {num_gpus}")
    spec = GPUS[key]
    if ib_gb_s is not None:
        spec = GPUSpec(spec.name, spec.memory_gib, spec.hbm_tb_s, spec.nvlink_gb_s, ib_gb_s, spec.gpus_per_node)
    per_node = gpus_per_node or spec.gpus_per_node
    return Cluster(gpu=spec, num_gpus=num_gpus, gpus_per_node=min(per_node, num_gpus))
