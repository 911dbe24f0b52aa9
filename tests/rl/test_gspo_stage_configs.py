"""The GSPO stage configs (tiny, 9B, 72B) load, validate at their cluster size, keep the GSPO
paper's clip range, and split a rollout batch into whole prompt groups on every DP rank."""

import pytest

from megatron_omni.config import load_config, validate
from megatron_omni.config.validate import data_parallel_size

SETS = {"configs/tiny/stages/gspo.yaml": 4, "configs/m2omni_9b/stages/gspo.yaml": 8,
        "configs/m2omni_72b/stages/gspo.yaml": 128}


@pytest.mark.parametrize("path", list(SETS))
def test_gspo_stage_config(path):
    world = SETS[path]
    cfg = load_config(path, ["data.root=/data"])
    validate(cfg, world)
    g, t = cfg.gspo, cfg.train
    assert (g.eps_low, g.eps_high) == (3e-4, 4e-4)  # GSPO paper Sec. 5.1
    assert cfg.data.omni_blend == "configs/data/gspo.yaml"
    assert set(cfg.omni.freeze) == {"vision_encoder", "audio_encoder"}  # as IT-3
    assert cfg.train.pretrained_checkpoint.endswith("it3/checkpoints")  # GSPO follows IT-3 ...
    dp = data_parallel_size(cfg, world)
    rollouts_per_rank = t.global_batch_size // dp * g.minibatches
    assert t.global_batch_size % (t.micro_batch_size * dp) == 0 and rollouts_per_rank % g.group_size == 0
    assert g.max_new_tokens < cfg.data.seq_length


@pytest.mark.parametrize("size", ["tiny", "m2omni_9b", "m2omni_72b"])
def test_alignment_tuning_starts_from_gspo(size):
    run = "tiny_stages" if size == "tiny" else size
    assert load_config(f"configs/{size}/stages/at.yaml", ["data.root=/data"]).train.pretrained_checkpoint == \
        f"runs/{run}/gspo/checkpoints"  # ... and DPO follows GSPO (Uni-MoE 2.0)


def test_bad_gspo_settings_are_one_clear_error():
    from megatron_omni.config.loader import ConfigError

    for override, match in [("gspo.group_size=1", "group_size must be >= 2"),
                            ("gspo.variant=tokens", "gspo.variant 'tokens'"),
                            ("gspo.temperature=0.7", "old_logprobs=recompute"),
                            ("gspo.reference=frozen_copy", "gspo.reference 'frozen_copy'")]:
        extra = ["gspo.old_logprobs=rollout"] if "temperature" in override else []
        with pytest.raises((ConfigError, ValueError), match=match):
            load_config("configs/tiny/stages/gspo.yaml", ["data.root=/data", override, *extra])
