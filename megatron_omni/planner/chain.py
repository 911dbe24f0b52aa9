"""One layout for a whole stage chain (M2-omni PT-1 ... AT, Table 2).

Stages train different modules at different sequence lengths, so each has its own best layout;
switching layouts between stages is possible (checkpoints reshard on load) but one layout for
the chain keeps the launch simple.  `plan_chain` takes the union of every stage's fastest
feasible layouts, keeps those legal and fitting in *every* stage, and ranks them by their worst
stage's speed relative to that stage's own best.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from megatron_omni.config.loader import ConfigError
from megatron_omni.planner.cluster import Cluster
from megatron_omni.planner.layout import Job, Layout, check_layout
from megatron_omni.planner.search import Assumptions, Estimate, evaluate, search


@dataclass(frozen=True)
class ChainLayout:
    layout: Layout
    estimates: Dict[str, Estimate]  # per stage
    best: Dict[str, Estimate]  # each stage's own fastest feasible layout

    def ratio(self, stage: str) -> float:
        return self.estimates[stage].tokens_per_s_per_gpu / self.best[stage].tokens_per_s_per_gpu

    @property
    def worst_ratio(self) -> float:
        return min(self.ratio(s) for s in self.estimates)

    def as_dict(self) -> Dict:
        return {
            "layout": self.layout.describe(), "worst_ratio": round(self.worst_ratio, 4),
            "overrides": next(iter(self.estimates.values())).as_dict()["overrides"],
            "stages": {s: {**e.as_dict(), "ratio_to_stage_best": round(self.ratio(s), 4),
                           "stage_best_layout": self.best[s].layout.describe()}
                       for s, e in self.estimates.items()},
        }


def plan_chain(jobs: Dict[str, Job], cluster: Cluster, assumptions: Assumptions = Assumptions(),
               per_stage: int = 8) -> List[ChainLayout]:
    """Common layouts for `jobs` ({stage name: Job}), best first; raises ConfigError when a stage
    has no feasible layout at all."""
    best: Dict[str, Estimate] = {}
    candidates: List[Layout] = []
    for stage, job in jobs.items():
        feasible = search(job, cluster, assumptions).feasible
        if not feasible:
            raise ConfigError(f"stage {stage}: no layout fits on {cluster.num_gpus} x {cluster.gpu.name}")
        best[stage] = feasible[0]
        candidates += [e.layout for e in feasible[:per_stage] if e.layout not in candidates]
    out: List[ChainLayout] = []
    for layout in candidates:
        estimates: Dict[str, Estimate] = {}
        for stage, job in jobs.items():
            try:
                check_layout(job, layout, cluster.num_gpus)
            except ConfigError:
                break
            e = evaluate(job, layout, cluster, assumptions)
            if not e.fits:
                break
            estimates[stage] = e
        else:
            out.append(ChainLayout(layout, estimates, best))
    out.sort(key=lambda c: -c.worst_ratio)
    return out
