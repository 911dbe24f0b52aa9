"""Uni-MoE 2.0-style mixture-of-experts backbone on megatron-core's MoE layer.

Shared experts (every token), routed experts (top-k or top-p per token) and null
experts (selectable, output zero, never dispatched).  Modules:

* `MoEConfig`, the typed `model.moe` section, is `megatron_omni.config.moe` (the schema uses it);
* `router`  -- `NullExpertRouter`, megatron's TopKRouter over E real + N null experts;
* `spec`    -- the GPT layer spec and TransformerConfig fields for an MoE backbone;
* `counter` -- `RoutingCounter`, a router's selections per expert and modality;
* `stats`   -- per-layer / per-modality routing statistics, summed over ranks.

Dense checkpoint -> MoE initialisation (sparse upcycling) is `megatron_omni.training.upcycle`.
"""
