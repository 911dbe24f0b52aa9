"""Generation on the training layout: KV-cached, batched, sampled, with per-token log-probs.

`generate.generate` is the entry point (see its module docstring for what megatron-core's inference
stack supplies); `sampling` picks tokens, `prompts` builds the left-padded batch (M-RoPE ids and
media for the omni model), `pipeline` runs one pass over the (virtual) pipeline stages.
"""
