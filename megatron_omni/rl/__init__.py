"""Reinforcement learning from verifiable rewards: the GSPO stage of Uni-MoE 2.0 ("progressive SFT
combined with a two-stage RL framework, GSPO followed by DPO").

* `gspo`       -- the GSPO objective (Zheng et al., 2025), sequence and token variants, clip fraction
* `advantages` -- group-normalised advantages over the G rollouts of a prompt
* `kl`         -- the k3 estimator of KL(pi_theta || pi_ref) (Schulman's "approximating KL"; GRPO / verl)
* `rewards`    -- rule rewards (exact match, multiple-choice letter, numeric with tolerance, format)
* `config`     -- the `gspo:` section of a run config
"""
