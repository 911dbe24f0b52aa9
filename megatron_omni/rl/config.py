"""The ``gspo:`` section of a run config: the RL stage of Uni-MoE 2.0 (GSPO, then DPO).

Each training step: every prompt of the step's batch is rolled out G times by the current policy
(`megatron_omni.inference.generate`, on the training ranks), the rollouts are scored by the rule
rewards of their blend source (`rl/rewards.py`), advantages are normalised within each group
(`rl/advantages.py`), then the rollout batch is split into ``minibatches`` and one optimizer step
is taken on each with the GSPO loss (`rl/gspo.py`); old log-probs are the rollout pass's.
"""

from __future__ import annotations

from dataclasses import dataclass
from megatron_omni.rl.advantages import STD_KINDS
from megatron_omni.rl.gspo import GSPO_VARIANTS

__all__ = ["GSPOConfig", "OLD_LOGPROBS", "REFERENCE_POLICIES"]

REFERENCE_POLICIES = ("lora_off",)  # a frozen full copy is not built (memory x2); LoRA-off is the DPO stage's reference too
OLD_LOGPROBS = ("rollout", "recompute")


@dataclass
class GSPOConfig:
    group_size: int = 8  # G rollouts per prompt (GSPO paper Sec. 5.1 / GRPO: a group per query)
    eps_low: float = 3e-4  # left clip range of s_i (GSPO paper Sec. 5.1: 3e-4)
    eps_high: float = 4e-4  # right clip range of s_i (GSPO paper Sec. 5.1: 4e-4)
    variant: str = "sequence"  # sequence (GSPO, Eq. 5) | token (GSPO-token, Eq. 13)
    # KL(pi_theta || pi_ref) weight, k3 estimator (GRPO Eq. 3-4); GSPO uses none.  The reference:
    # the same network with its LoRA adapters off (needs a lora: section; as the DPO stage's).
    kl_coef: float = 0.0
    reference: str = "lora_off"
    # pi_old's log-probs: "rollout" = the sampler's (generate(): normalised over every output logit,
    # equal to the training forward's -cross-entropy; logged rollout_logp_gap 2e-7 fp32 / 1e-7 bf16
    # on the tiny model, CPU), "recompute" = a forward-only pass of the training forward over the
    # rollouts before the updates (verl's default): for kernels whose decode and training forwards
    # round differently by more than GSPO's 3e-4 clip range (bf16 on GPU).
    old_logprobs: str = "rollout"
    advantage_eps: float = 1e-6  # eps of A_i = (r_i - mean) / (std + eps) (GRPO Sec. 4.1.2)
    advantage_std: str = "sample"  # sample (verl / TRL's torch.std) | population
    # optimizer steps per rollout batch: the batch of prompts x G rollouts is split into this many
    # mini-batches, one update each (GSPO paper Sec. 5.1: "each batch of rollout data is
    # partitioned into four minibatches for gradient updates"); 1 = on-policy.
    # The rollout batch of a GSPO step is train.global_batch_size x minibatches rollouts, i.e.
    # global_batch_size x minibatches / G prompts; train.steps counts optimizer updates.
    minibatches: int = 4
    max_new_tokens: int = 32  # generation length cap of a rollout
    temperature: float = 1.0  # rollout sampling (GSPO paper: sampled from pi_old, T = 1)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"gspo.group_size must be >= 2 (advantages are normalised within a group), got {self.group_size}")
        if self.variant not in GSPO_VARIANTS:
            raise ValueError(f"gspo.variant {self.variant!r}; use one of {', '.join(GSPO_VARIANTS)}")
        if self.advantage_std not in STD_KINDS:
            raise ValueError(f"gspo.advantage_std {self.advantage_std!r}; use one of {', '.join(STD_KINDS)}")
        if self.old_logprobs not in OLD_LOGPROBS:
            raise ValueError(f"gspo.old_logprobs {self.old_logprobs!r}; use one of {', '.join(OLD_LOGPROBS)}")
        if self.old_logprobs == "rollout" and self.temperature != 1.0:
            raise ValueError(f"gspo.temperature={self.temperature} with old_logprobs=rollout: the sampler's log-probs "
                             f"are of logits / T, the training forward's of the logits; set old_logprobs=recompute")
        if self.reference not in REFERENCE_POLICIES:
            raise ValueError(f"gspo.reference {self.reference!r}; use one of {', '.join(REFERENCE_POLICIES)}")
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise ValueError(f"gspo clip range needs 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")
        if self.kl_coef < 0:
            raise ValueError(f"gspo.kl_coef must be >= 0, got {self.kl_coef}")
        if self.minibatches < 1 or self.max_new_tokens < 1:
            raise ValueError("gspo.minibatches and gspo.max_new_tokens must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"gspo.temperature must be > 0 (rollouts are sampled), got {self.temperature}")
        if not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"gspo.top_p must be in (0, 1] and top_k >= 0, got {self.top_p}, {self.top_k}")
