"""Enumerate legal layouts, price them, keep those that fit, rank by tokens/s/GPU."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from megatron_omni.config.loader import ConfigError
from megatron_omni.config.schema import ModelConfig
from megatron_omni.planner.cluster import Cluster
from megatron_omni.planner.layout import RECOMPUTE, Job, Layout, check_layout, launch_overrides
from megatron_omni.planner.memory import MemoryAssumptions, MemoryBreakdown, estimate_memory
from megatron_omni.planner.timing import Efficiency, Overlap, TimeBreakdown, estimate_step, row_segment_mix
from megatron_omni.training import flops as F

MICRO_BATCHES = (1, 2, 4)
CP_SIZES = (1, 2, 4, 8)
# Usable fraction of GPU memory.  0.95, not 0.9: the memory model is an upper bound (every
# tensor counted at its peak), and Megatron-Bridge's Llama-3-70B FP8 TP4/PP8/VP5 layout,
# which runs on 80 GB H100s, is priced at 75.4 of 79.6 GiB (94.8 %).
DEFAULT_HEADROOM = 0.95


@dataclass(frozen=True)
class Assumptions:
    efficiency: Efficiency = Efficiency()
    overlap: Overlap = Overlap()
    memory: MemoryAssumptions = MemoryAssumptions()
    headroom: float = DEFAULT_HEADROOM  # usable fraction of GPU memory (allocator fragmentation)


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    dp: int
    memory: MemoryBreakdown
    time: TimeBreakdown
    tokens_per_s_per_gpu: float
    tflops_per_gpu: float
    mfu: Optional[float]
    fits: bool
    flops_per_token: float
    job: Job
    llm_flops_per_token: float = 0.0  # the LLM's share of flops_per_token (packed rows: sum L_i^2 attention)

    def as_dict(self) -> Dict:
        lay = self.layout
        return {
            "tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp, "cp": lay.cp, "dp": self.dp, "ep": lay.ep,
            "micro_batch": lay.micro_batch, "recompute": lay.recompute,
            "first_stage_layers": lay.first_stage_layers, "encoder_recompute": lay.encoder_recompute,
            "num_microbatches": self.time.num_microbatches,
            "memory_gib_per_gpu": round(self.memory.total_gib, 2),
            "tokens_per_s_per_gpu": round(self.tokens_per_s_per_gpu, 1),
            "tflops_per_gpu": round(self.tflops_per_gpu, 1),
            "mfu": None if self.mfu is None else round(self.mfu, 4),
            "step_time_s": round(self.time.step_s, 4),
            "fits": self.fits,
            "flops_per_token": self.flops_per_token,
            "llm_flops_per_token": self.llm_flops_per_token,
            "memory": self.memory.as_dict(),
            "overrides": launch_overrides(self.job, lay),
            "time": self.time.as_dict(),
        }


def evaluate(job: Job, layout: Layout, cluster: Cluster, assumptions: Assumptions = Assumptions()) -> Estimate:
    """Price one layout (which must already pass `check_layout`)."""
    n = cluster.num_gpus
    if job.omni is not None:
        job = dataclasses.replace(job, omni=job.omni.with_encoder_recompute(layout.encoder_recompute))
    mem = estimate_memory(job, layout, n, assumptions.memory)
    t = estimate_step(job, layout, cluster, assumptions.efficiency, assumptions.overlap, assumptions.memory)
    weight_grads = job.omni is None or job.omni.trainable("llm")
    num_microbatches = layout.num_microbatches(n, job.global_batch)
    # Per row, the training's own formula on the row's samples (sum L_i^2 attention); a text job's
    # one sequence per row is Megatron-LM's llm_flops_per_step.
    step_flops = job.global_batch * sum(
        share * F.llm_flops(job.model, segments, tp=layout.tp, weight_grads=weight_grads)
        for share, segments in row_segment_mix(job, num_microbatches))
    llm_flops = step_flops
    if job.omni is not None:
        microbatches = job.global_batch // layout.micro_batch
        step_flops += microbatches * job.omni.model_flops_per_microbatch(
            job.seq_len, layout.micro_batch, num_microbatches)
    tflops = step_flops / t.step_s / n / 1e12
    return Estimate(
        layout=layout,
        dp=layout.dp(n),
        memory=mem,
        time=t,
        tokens_per_s_per_gpu=job.global_batch * job.seq_len / t.step_s / n,
        tflops_per_gpu=tflops,
        mfu=F.mfu(tflops, cluster.gpu.name, job.precision),
        fits=mem.total_gib <= cluster.gpu.memory_gib * assumptions.headroom,
        flops_per_token=step_flops / (job.global_batch * job.seq_len),
        job=job,
        llm_flops_per_token=llm_flops / (job.global_batch * job.seq_len),
    )


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def ep_choices(model: ModelConfig) -> Sequence[int]:
    """Expert-parallel sizes to try: dense models ep=1, MoE the divisors of the routed-expert count."""
    return _divisors(model.moe.num_experts) if model.moe is not None else (1,)


def candidates(job: Job, cluster: Cluster) -> Iterator[Layout]:
    """Every combination in the search space (legal or not; `check_layout` filters)."""
    n, layers = cluster.num_gpus, job.model.num_layers
    tps = [t for t in _divisors(min(8, cluster.gpus_per_node)) if n % t == 0]
    for tp in tps:
        for cp in (c for c in CP_SIZES if n % (tp * c) == 0):
            for pp in (p for p in _divisors(layers) if n % (tp * cp * p) == 0):
                vpps: List[Optional[int]] = [None]
                if pp > 1:
                    vpps += [v for v in _divisors(layers // pp) if v > 1]
                for vpp in vpps:
                    for ep in ep_choices(job.model):
                        for mbs in MICRO_BATCHES:
                            for rc in RECOMPUTE:
                                yield Layout(tp=tp, pp=pp, vpp=vpp, cp=cp, ep=ep, micro_batch=mbs, recompute=rc)


@dataclass
class SearchResult:
    feasible: List[Estimate] = field(default_factory=list)  # ranked, best first
    infeasible: List[Estimate] = field(default_factory=list)  # legal but over memory, smallest first
    rejected: int = 0  # combinations megatron would refuse


def rank_key(e: Estimate) -> Tuple[float, float]:
    return (-e.tokens_per_s_per_gpu, e.memory.total_gib)


def omni_choices(job: Job, layout: Layout) -> List[Layout]:
    """An omni base layout's variants: first-stage splits x encoder recompute (when an encoder trains)."""
    recompute = [None, not job.omni.encoder_recompute] if job.omni is not None and job.omni.trains_an_encoder \
        else [None]
    return [dataclasses.replace(layout, first_stage_layers=f, encoder_recompute=r)
            for f in first_stage_choices(job, layout) for r in recompute]


def first_stage_choices(job: Job, layout: Layout) -> List[Optional[int]]:
    """Decoder layers to try on the encoders' stage: the even split and every smaller legal one
    (the rest divides evenly over the other stages).  Only omni models on plain 1F1B pipelines
    (megatron-omni's config rejects an uneven first stage with virtual stages)."""
    if job.omni is None or layout.pp == 1 or layout.vpp is not None:
        return [layout.first_stage_layers]
    layers, pp = job.model.num_layers, layout.pp
    return [None] + [f for f in range(1, layers // pp) if (layers - f) % (pp - 1) == 0]


def search(job: Job, cluster: Cluster, assumptions: Assumptions = Assumptions()) -> SearchResult:
    out = SearchResult()
    for base in candidates(job, cluster):
        try:
            check_layout(job, base, cluster.num_gpus)
        except ConfigError:
            out.rejected += 1
            continue
        # An omni layout keeps its best first-stage split and encoder recompute (fitting first,
        # then fastest).
        options = [evaluate(job, layout, cluster, assumptions) for layout in omni_choices(job, base)]
        fitting = [e for e in options if e.fits]
        if fitting:
            out.feasible.append(min(fitting, key=rank_key))
        else:
            out.infeasible.append(min(options, key=lambda e: e.memory.total_gib))
    out.feasible.sort(key=rank_key)
    out.infeasible.sort(key=lambda e: e.memory.total_gib)
    return out
