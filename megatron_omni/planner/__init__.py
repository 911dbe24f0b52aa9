"""Cluster planner: enumerate TP/PP/VPP/CP/DP/EP, micro-batch and recompute choices for a
model on a GPU cluster, estimate per-GPU memory and step time, rank the layouts that fit.

Modules: `cluster` (GPU/interconnect specs), `layout` (a candidate layout, its legality via
`config.validate`), `memory` (per-GPU bytes), `timing` (step time), `search` (enumerate and
rank), `anchors` (published measurements the model is calibrated and checked against).
CLI: `tools/plan.py`.
"""

from megatron_omni.planner.cluster import GPUS, Cluster, GPUSpec, make_cluster
from megatron_omni.planner.layout import Job, Layout, check_layout, parse_layout, run_config
from megatron_omni.planner.memory import MemoryAssumptions, MemoryBreakdown, estimate_memory, param_counts
from megatron_omni.planner.search import Assumptions, Estimate, SearchResult, evaluate, search
from megatron_omni.planner.timing import Efficiency, Overlap, TimeBreakdown, estimate_step

__all__ = [
    "GPUS", "Assumptions", "Cluster", "Efficiency", "Estimate", "GPUSpec", "Job", "Layout",
    "MemoryAssumptions", "MemoryBreakdown", "Overlap", "SearchResult", "TimeBreakdown",
    "check_layout", "estimate_memory", "estimate_step", "evaluate", "make_cluster",
    "param_counts", "parse_layout", "run_config", "search",
]
