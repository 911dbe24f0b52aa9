"""`NullExpertRouter`: megatron's TopKRouter scoring E real + N null experts, top-k or top-p.

Routing (one token x, logits over all M = E + N experts from one gating GEMM):

* ``s = softmax(W x)`` over the M experts;
* top-k: the k highest-scoring experts (megatron's `topk_routing_with_score_function`,
  so pre-/post-softmax and the top-k scaling factor behave as in megatron);
* top-p (Uni-MoE 2.0 dynamic capacity, arXiv:2511.12609): experts sorted by ``s`` are taken
  until their cumulative probability reaches p, at most k of them;
* the weights of the chosen experts are their scores (no renormalisation after removing
  null experts: a null expert's share of the weight is the share that contributes zero).

The null columns are then cut off the routing map and probs *before* the token dispatcher
sees them: megatron's dispatcher only knows the E real experts, so a null selection moves no
token and costs no FLOP, and a token that picked only null experts receives exactly zero from
the routed branch (the shared expert still runs on it).

Load-balancing loss over the real experts only (Switch Transformer, Fedus et al. 2021,
arXiv:2101.03961 Eq. 4, as megatron's `switch_load_balancing_loss_func` computes it):

    L_aux = coeff * E * sum_{i<E} f_i * P_i
    f_i = (1 / (T k)) * #{selections of real expert i}      (from the routing map, pre-drop)
    P_i = (1 / T) * sum_x s_i(x)                              (s = softmax over all E + N)

T = tokens of the micro-batch over the TP x CP group; the loss is weighted by that T (not by the
rank's share, as megatron does), so its gradient is the same at every TP / CP / EP layout.  Null experts are absent from the sum:
they hold no parameters and nothing needs balancing on them, while their probability mass
still lowers the P_i of real experts, so the loss does not push tokens off the null experts.
With top-p, k is the upper bound (megatron's normalisation by T k is kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import (
    apply_router_token_dropping,
    get_tokens_per_expert_and_token_count,
    switch_load_balancing_loss_func,
    topk_routing_with_score_function,
)
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_omni.models.moe.counter import RoutingCounter


@dataclass(frozen=True)
class NullRoutingOptions:
    """What megatron's TransformerConfig has no field for (see MoEConfig)."""

    num_null_experts: int = 0
    router_type: str = "topk"  # topk | topp
    router_topp: float = 1.0


def topp_routing(logits: torch.Tensor, top_p: float, max_k: int):
    """Top-p routing bounded by k: (probs, routing_map), both [tokens, experts].

    Experts sorted by softmax probability are selected while the probability mass of the
    experts ranked above them is still below `top_p`; the first expert is always selected.
    """
    scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    top_scores, top_indices = torch.topk(scores, k=max_k, dim=-1)  # sorted, descending
    mass_before = torch.cumsum(top_scores, dim=-1) - top_scores
    keep = mass_before < top_p
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, top_indices, keep)
    probs = (scores * routing_map).type_as(logits)
    return probs, routing_map


class NullExpertRouter(TopKRouter):
    """TopKRouter over ``E + N`` outputs whose null selections never reach the dispatcher.

    ``config.num_moe_experts`` stays E (the dispatcher and experts see only real experts); the
    gating weight has E + N rows, rows ``E..E+N-1`` scoring the null experts.
    """

    def __init__(self, config: TransformerConfig, pg_collection=None, *, options: NullRoutingOptions):
        super().__init__(config=config, pg_collection=pg_collection)
        if options.router_type not in ("topk", "topp"):
            raise ValueError(f"router_type must be topk or topp, got {options.router_type!r}")
        if self.routing_type not in ("aux_loss", "none"):
            raise ValueError(
                f"NullExpertRouter supports moe_router_load_balancing_type aux_loss|none, got {self.routing_type!r}"
            )
        if self.enable_expert_bias:
            raise ValueError("NullExpertRouter does not support moe_router_enable_expert_bias")
        self.options = options
        self.num_real = config.num_moe_experts
        self.num_outputs = self.num_real + options.num_null_experts
        if options.num_null_experts:
            self.weight = torch.nn.Parameter(
                torch.empty((self.num_outputs, config.hidden_size), dtype=torch.float32)
            )
            if self.bias is not None:
                self.bias = torch.nn.Parameter(torch.empty((self.num_outputs,), dtype=torch.float32))
            self.reset_parameters()
        self.counter = RoutingCounter(self.num_real, options.num_null_experts)

    def select(self, logits: torch.Tensor):
        """(probs, routing_map) over all E + N experts for flat logits [tokens, E + N]."""
        if self.options.router_type == "topp":
            return topp_routing(logits, self.options.router_topp, self.topk)
        return topk_routing_with_score_function(
            logits,
            self.topk,
            use_pre_softmax=self.config.moe_router_pre_softmax,
            scaling_factor=self.config.moe_router_topk_scaling_factor,
            score_function="softmax",
            fused=False,
        )

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        if padding_mask is not None:
            raise NotImplementedError("NullExpertRouter: padding_mask is not supported; mask the loss instead")
        logits = logits.reshape(-1, self.num_outputs)
        logits = self.apply_z_loss(logits)
        probs, routing_map = self.select(logits)
        if self.training:
            self.counter.record(routing_map)

        # Null experts leave here: the dispatcher never sees them.
        real_probs = probs[:, : self.num_real]
        real_map = routing_map[:, : self.num_real]

        if self.config.moe_expert_capacity_factor is not None:
            real_probs, real_map = apply_router_token_dropping(
                real_probs,
                real_map,
                router_topk=self.topk,
                capacity_factor=self.config.moe_expert_capacity_factor,
                drop_policy=self.config.moe_token_drop_policy,
                pad_to_capacity=self.config.moe_pad_expert_input_to_capacity,
            )

        coeff = self.get_aux_loss_coeff("aux_loss")
        if self.training and torch.is_grad_enabled() and coeff > 0:
            real_probs = self._attach_real_expert_aux_loss(real_probs, logits, routing_map[:, : self.num_real], coeff)
        return real_probs.contiguous(), real_map.contiguous()

    def _attach_real_expert_aux_loss(self, real_probs, logits, real_map_before_drop, coeff):
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)[:, : self.num_real]
        tokens_per_expert, _, total_tokens = get_tokens_per_expert_and_token_count(
            routing_map=real_map_before_drop, reduce_group=self.tp_cp_group, topk=self.topk
        )
        aux_loss = switch_load_balancing_loss_func(
            probs=scores,
            tokens_per_expert=tokens_per_expert,
            total_num_tokens=total_tokens,
            topk=self.topk,
            num_experts=self.num_real,
            moe_aux_loss_coeff=coeff,
            fused=False,
        )
        self.counter.record_aux_loss(aux_loss.detach() / coeff, group_size=self.tp_cp_group.size())
        # Per-token loss convention: the micro-batch's aux loss is weighted by its token count T
        # (finalize_model_grads divides every gradient by the global token count).  Under sequence /
        # context parallelism each rank holds a partial sum aux_j (sum_j aux_j = aux), so each is
        # weighted by the full T of its TP x CP group.  megatron weights by the rank's T / (tp * cp),
        # which shrinks the balancing gradient by tp * cp relative to a single-rank run.
        return self.attach_and_log_load_balancing_loss(
            real_probs, coeff, aux_loss, "load_balancing_loss", self.tp_cp_group, valid_token_count=total_tokens
        )
