"""`model.moe`: the typed MoE section of a model config.

Kept free of torch / megatron imports: `config/schema.py` types `ModelConfig.moe` with it.

Names follow megatron-core's TransformerConfig `moe_*` fields where megatron has the
concept (so Megatron-LM users recognise them); the Uni-MoE 2.0 additions are
`num_null_experts` and `router_type: topp` (dynamic capacity, Uni-MoE 2.0, arXiv:2511.12609,
"Dynamic-Capacity MoE": shared + routed + null experts, top-P routing bounded by top-K).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class MoEConfig:
    num_experts: int = 8  # routed experts E (megatron num_moe_experts); every layer is MoE
    # Null experts N: the router scores E + N experts; choosing a null one computes nothing and
    # adds zero, so a token may use fewer than k routed experts (dynamic capacity).
    num_null_experts: int = 0
    router_type: str = "topk"  # topk | topp
    router_topk: int = 2  # k; with topp the upper bound on experts per token
    # topp: experts (by descending probability, over E + N) are taken until their cumulative
    # probability reaches router_topp, at most router_topk of them.
    router_topp: float = 0.7
    # topk only: softmax over all E + N experts, then top-k (True: Qwen2-MoE / Uni-MoE weights,
    # not renormalised); False = megatron default, top-k on logits then softmax over the k.
    router_pre_softmax: bool = True
    router_topk_scaling_factor: Optional[float] = None
    ffn_hidden_size: int = 1408  # routed expert SwiGLU width (megatron moe_ffn_hidden_size)
    # Total shared-expert width (megatron moe_shared_expert_intermediate_size); None = no shared expert.
    shared_expert_ffn_hidden_size: Optional[int] = 5632
    # sigmoid(x . w) gate on the shared expert output (Qwen2-MoE's shared_expert_gate).
    shared_expert_gate: bool = False
    # Switch-Transformer load-balancing loss over the real experts (see router.py); 0 = off.
    aux_loss_coeff: float = 1e-2
    # ST-MoE router z-loss (arXiv:2202.08906 Eq. 5), megatron's implementation: under sequence / context
    # parallelism megatron weights it by the rank's token share (its gradient shrinks by tp * cp).
    z_loss_coeff: Optional[float] = None
    token_dispatcher_type: str = "alltoall"  # alltoall | allgather
    # Token dropping (megatron): None = dropless; else each expert takes at most
    # capacity_factor * tokens * k / E tokens, dropping by token_drop_policy.
    capacity_factor: Optional[float] = None
    token_drop_policy: str = "probs"  # probs | position
    pad_expert_input_to_capacity: bool = False
    # Expert GEMMs: TE grouped GEMM (TEGroupedMLP) when Transformer Engine runs, else one
    # GEMM per local expert (SequentialMLP).  false forces SequentialMLP.
    grouped_gemm: bool = True
    # FLOP / planner accounting only: the expected fraction of router selections that pick a
    # null expert. None = N / (E + N), i.e. a router that spreads its choices uniformly.
    expected_null_rate: Optional[float] = None

    @property
    def num_router_outputs(self) -> int:
        return self.num_experts + self.num_null_experts

    def null_rate_for_accounting(self) -> float:
        if self.expected_null_rate is not None:
            return self.expected_null_rate
        return self.num_null_experts / self.num_router_outputs

    def routed_experts_per_token(self) -> float:
        """Expected routed experts computed per token: k x (1 - null rate); an upper bound with topp."""
        return self.router_topk * (1.0 - self.null_rate_for_accounting())
