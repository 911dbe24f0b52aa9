"""Training tasks: what `pretrain` trains (see `base.py` for the interface).

    text.py       TextTask       Llama text pretraining (no `omni:` section)
    omni.py       OmniTask       the omni-modal stages (`omni:` section)
    alignment.py  AlignmentTask  alignment tuning, DPO (Eq. 2): the omni task with preference pairs (`dpo:`)
    gspo.py       GSPOTask       the RL stage: the omni task with rollouts and the GSPO loss (`gspo:`)
"""

from __future__ import annotations

from megatron_omni.config import RunConfig
from megatron_omni.training.tasks.base import Task, num_microbatches


def task_for(cfg: RunConfig) -> Task:
    """The task a run config describes (imports only that task's model and data code)."""
    if cfg.omni is None:
        from megatron_omni.training.tasks.text import TextTask

        return TextTask(cfg)
    if cfg.gspo is not None:
        from megatron_omni.training.tasks.gspo import GSPOTask

        return GSPOTask(cfg)
    if cfg.dpo is not None:
        from megatron_omni.training.tasks.alignment import AlignmentTask

        return AlignmentTask(cfg)
    from megatron_omni.training.tasks.omni import OmniTask

    return OmniTask(cfg)


__all__ = ["Task", "num_microbatches", "task_for"]
