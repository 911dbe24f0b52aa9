"""Routing statistics: how often each expert (real and null) is chosen, per layer and modality.

Every `NullExpertRouter` owns a `RoutingCounter` (counter.py) that adds up, during training forwards, the
router's selections over all E + N experts under the *current modality* (set per micro-batch
with `set_current_modality`; "all" when nobody sets one).  `collect_routing_stats` sums the
counters of every rank (a collective) and turns them into fractions:

    experts[i]  = selections of expert i / all selections of the layer   (i over E real + N null)
    null_rate   = sum of the null experts' fractions
    all_null_token_rate = tokens whose every selection was a null expert / tokens
    load_balancing_loss = mean over forwards of the real-expert aux loss (without its coeff)

so the per-layer fractions sum to 1.  The training loop records and collects them on logging
steps only (`train.log_interval`; metrics.jsonl rows of other steps have no "moe" entry).  Ranks that see the same tokens (TP without sequence
parallelism) count them once each; that scales a layer's counts, not its fractions.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterable, Iterator, List

import torch
import torch.distributed as dist

from megatron_omni.models.moe.router import NullExpertRouter


def _routers(model) -> Iterator[torch.nn.Module]:
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, NullExpertRouter):
                yield module


def set_current_modality(model, name: str) -> None:
    """Attribute the following forwards' routing to modality `name` (e.g. "text", "image")."""
    for router in _routers(model):
        router.counter.modality = name


def set_routing_stats_enabled(model, enabled: bool) -> None:
    """Record routing statistics in the following training forwards (the loop's logging steps)."""
    for router in _routers(model):
        router.counter.enabled = enabled


def layer_fractions(counts: torch.Tensor, num_real: int, num_null: int) -> Dict[str, float]:
    """One layer's counts -> {"e0".., "null0".., "null_rate", "all_null_token_rate", "tokens"}."""
    selections = counts[: num_real + num_null]
    total = selections.sum().clamp(min=1.0)
    frac = (selections / total).tolist()
    row = {f"e{i}": frac[i] for i in range(num_real)}
    row.update({f"null{j}": frac[num_real + j] for j in range(num_null)})
    row["null_rate"] = float(sum(frac[num_real:]))
    row["all_null_token_rate"] = float(counts[-3] / counts[-4].clamp(min=1.0))
    row["tokens"] = float(counts[-4])
    if counts[-1] > 0:
        row["load_balancing_loss"] = float(counts[-2] / counts[-1])
    return row


def collect_routing_stats(model, *, reset: bool = True) -> Dict[str, dict]:
    """Routing statistics of every MoE layer of the model, summed over all ranks (collective:
    every rank must call it).  Returns {modality: {"null_rate": mean over layers,
    "layers": {"00": {e0.., null0.., null_rate, all_null_token_rate, tokens}, ...}}}, ready to be a
    metrics.jsonl row's "moe" entry (TensorBoard gets every leaf as a scalar)."""
    local: Dict[str, Dict[int, List[float]]] = defaultdict(dict)
    shape = None
    for router in _routers(model):
        shape = (router.num_real, router.options.num_null_experts)
        for modality, counts in router.counter.counts.items():
            # layer_number is 1-based and global across pipeline stages.
            local[modality][router.layer_number - 1] = counts.tolist()
        if reset:
            router.counter.reset()
    parts: List = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(parts, (shape, dict(local)))
    else:
        parts = [(shape, dict(local))]
    merged: Dict[str, Dict[int, torch.Tensor]] = defaultdict(dict)
    for part_shape, part in parts:
        shape = shape or part_shape
        for modality, layers in part.items():
            for layer, counts in layers.items():
                t = torch.tensor(counts, dtype=torch.float64)
                merged[modality][layer] = merged[modality].get(layer, 0) + t
    out: Dict[str, dict] = {}
    for modality in sorted(merged):
        layers = {f"{layer:02d}": layer_fractions(c, *shape) for layer, c in sorted(merged[modality].items())}
        null_rates = [row["null_rate"] for row in layers.values()]
        out[modality] = {"null_rate": sum(null_rates) / len(null_rates), "layers": layers}
    return out


def moe_routers(model) -> Iterable[torch.nn.Module]:
    """The NullExpertRouters of a model (list of chunks or one module)."""
    return list(_routers(model))
