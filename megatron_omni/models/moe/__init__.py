"""Uni-MoE 2.0-style mixture-of-experts backbone on megatron-core's MoE layer.

Shared experts (every token), routed experts (top-k or top-p per token) and null
experts (selectable, output zero, never dispatched).  Modules:

* `config`  -- `MoEConfig`, the typed `model.moe` section (no torch import: the schema uses it);
* `router`  -- `NullExpertRouter`, megatron's TopKRouter over E real + N null experts;
* `spec`    -- the GPT layer spec and TransformerConfig fields for an MoE backbone;
* `stats`   -- per-layer / per-modality routing statistics;
* `upcycle` -- dense checkpoint -> MoE initialisation.
"""
