"""`OmniTask`: the omni-modal stages of M2-omni (pretraining, instruction tuning, alignment tuning).

Model: `models/omni.build_omni_chunks` (the Llama backbone with the omni vocabulary, the vision and
audio encoders on the first pipeline stage), layout-invariant init, `omni.freeze` applied before
DDP so frozen modules get no gradient buffer.  Data: `training/omni_data.py::OmniData` -- each
step's modality plan from the scheduler (Sec. 3.1-3.3), microbatches from the stage's source
(the blend loader or mock data, `data/omni_source.py::OmniSource`), loss scales of Eq. 5/7.
Loss: `training/omni_step.py::omni_forward_step` (per-token LM loss, per-modality reports).
Validation: each modality's held-out loss, which also drives the adaptive balance (Eq. 8-11).

Variants: alignment tuning (DPO pairs, `alignment.py`) and the GSPO stage (`gspo.py`).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterator, List, Optional

import torch

from megatron_omni.config import RunConfig
from megatron_omni.models import omni
from megatron_omni.parallel.layout import unwrap
from megatron_omni.training import flops
from megatron_omni.training.omni_data import OmniData, build_omni_data
from megatron_omni.training.omni_step import omni_forward_step
from megatron_omni.training.setup import TrainState
from megatron_omni.training.step import StepResult, run_schedule
from megatron_omni.training.tasks.base import StepSamples, num_microbatches

log = logging.getLogger("megatron_omni.train")


class OmniTask:
    forward_step_func = staticmethod(omni_forward_step)

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.data: Optional[OmniData] = None

    def build_model(self, params_dtype: torch.dtype) -> List[torch.nn.Module]:
        cfg = self.cfg
        chunks = omni.build_omni_chunks(cfg.model, cfg.parallel, cfg.omni, seq_length=cfg.data.seq_length,
                                        params_dtype=params_dtype)
        omni.init_omni_weights_layout_invariant(chunks, cfg.model, cfg.omni, cfg.train.seed)
        trainable = omni.apply_freeze(chunks, cfg.omni.freeze)
        log.info("omni model: trainable parameters on this rank %s; frozen: %s",
                 {k: v for k, v in trainable.items() if v}, cfg.omni.freeze or "none")
        return chunks

    def llm_flops_per_step(self) -> float:
        cfg = self.cfg  # a frozen LLM (omni.freeze) runs no weight-gradient GEMMs
        return flops.llm_flops_per_step(cfg.model, cfg.train.global_batch_size, cfg.data.seq_length,
                                        tp=cfg.parallel.tp, weight_grads="llm" not in cfg.omni.freeze)

    def build_data(self, state: TrainState) -> None:
        self.data = build_omni_data(self.cfg, unwrap(state.model[0]).vocab, len(state.model),
                                    num_microbatches(self.cfg))

    def step_iterators(self, state: TrainState) -> List[Optional[Iterator]]:
        return self.data.step_iterators(state.step, state.model)

    def step_metrics(self, state: TrainState, result: StepResult, step_time_s: float) -> Dict[str, Any]:
        row = self.data.step_metrics(result.losses_reduced)  # collective
        row["tokens_per_s_by_modality"] = {m: n / step_time_s for m, n in self.data.tokens_per_modality().items()}
        row["modality_weights"] = self.data.modality_weights(state.step - 1)  # the step just run
        return row

    def step_samples(self, state: TrainState) -> StepSamples:
        return self.data.step_samples()

    def validate(self, state: TrainState) -> Dict[str, Any]:
        """Per-modality validation losses; fed to the adaptive balancer when it is on."""
        row: Dict[str, Any] = {"val_losses": self.data.validation_losses(state.model, run_schedule)}
        new_weights = self.data.update_balance(row["val_losses"])
        if new_weights is not None:
            row["adaptive_weights"] = new_weights
        return row

    def state_dict(self) -> Optional[dict]:
        return self.data.state_dict()

    def load_state_dict(self, state: Optional[dict]) -> None:
        self.data.load_state_dict(state)

    def before_checkpoint(self) -> None:
        self.data.before_checkpoint()
