"""Training pieces built on the omni task for tools: the single-modality trainer of the step-balance
calibration (paper Alg. 1 lines 3-8, `tools/calibrate_step_balance.py`)."""

from __future__ import annotations

import dataclasses
from typing import Callable

from megatron_omni.balance import SchedulerConfig
from megatron_omni.config import RunConfig


def single_modality_trainer(cfg: RunConfig, modality: str) -> Callable[[str], float]:
    """`train_one_step(modality) -> loss`: the stage's model, from its initial weights
    (`train.pretrained_checkpoint`, else the seeded init), trained on `modality` alone -- every
    microbatch of every update carries it -- with the stage's optimizer settings."""
    from megatron_omni.training.checkpoint import load_checkpoint
    from megatron_omni.training.loop import build_train_state
    from megatron_omni.training.step import train_step
    from megatron_omni.training.tasks import num_microbatches
    from megatron_omni.training.tasks.omni import OmniTask

    alone = SchedulerConfig(mode="round_robin", modalities=[modality], pure_text_share=None)
    cfg = dataclasses.replace(cfg, balance=alone)
    task = OmniTask(cfg)
    state = build_train_state(cfg, task=task)
    if cfg.train.pretrained_checkpoint:
        load_checkpoint(state, cfg.train.pretrained_checkpoint, finetune=True)
    task.build_data(state)

    def train_one_step(asked: str) -> float:
        if asked != modality:
            raise ValueError(f"this trainer calibrates {modality!r}, asked for {asked!r}")
        result = train_step(state, task.step_iterators(state), num_microbatches=num_microbatches(cfg),
                            seq_length=cfg.data.seq_length, micro_batch_size=cfg.train.micro_batch_size,
                            forward_step_func=task.forward_step_func)
        state.step += 1
        return result.loss

    return train_one_step
