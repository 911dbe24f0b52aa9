"""`RoutingCounter`: one router's selections per expert (real and null) and modality, on the device.

Owned by each `NullExpertRouter`; read, summed over ranks and turned into fractions by stats.py.
"""

from __future__ import annotations

from typing import Dict

import torch

DEFAULT_MODALITY = "all"


class RoutingCounter:
    """Selections per expert (E real then N null) and token counts, keyed by modality.

    Counts stay on the device of the routing map (no host read per layer and forward); they are
    read once, by `collect_routing_stats`.  `enabled` (set per step by the training loop with
    `set_routing_stats_enabled`: logging steps only) switches recording off in between."""

    def __init__(self, num_real: int, num_null: int):
        self.num_real, self.num_null = num_real, num_null
        self.modality = DEFAULT_MODALITY
        self.enabled = True
        self.reset()

    def reset(self) -> None:
        # [E + N] selections, tokens routed, tokens with no real expert, aux-loss sum, aux-loss count.
        self.counts: Dict[str, torch.Tensor] = {}

    def _row(self, device) -> torch.Tensor:
        if self.modality not in self.counts:
            self.counts[self.modality] = torch.zeros(self.num_real + self.num_null + 4, dtype=torch.float64,
                                                     device=device)
        return self.counts[self.modality]

    @torch.no_grad()
    def record(self, routing_map: torch.Tensor) -> None:
        """`routing_map`: [tokens, E + N] bool selections of one forward."""
        if not self.enabled:
            return
        row = self._row(routing_map.device)
        row[: self.num_real + self.num_null] += routing_map.sum(dim=0).double()
        row[-4] += routing_map.shape[0]
        row[-3] += (~routing_map[:, : self.num_real].any(dim=1)).sum().double()

    @torch.no_grad()
    def record_aux_loss(self, value: torch.Tensor, group_size: int = 1) -> None:
        """`value`: this rank's share of the micro-batch's aux loss.  Under sequence / context
        parallelism the `group_size` ranks of a TP x CP group hold partial sums, so each counts as
        1 / group_size of a forward and the collected mean is the full loss."""
        if not self.enabled:
            return
        row = self._row(value.device)
        row[-2] += value.double()
        row[-1] += 1.0 / group_size
