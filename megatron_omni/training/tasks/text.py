"""`TextTask`: Llama text pretraining on megatron GPT datasets (the loop's text path).

Model: `models/llama.build_llama_chunks`, layout-invariant init.  Data: `training/text_data.py`
(train / validation datasets, one iterator per chunk that reads tokens or labels, positioned by
`consumed_samples`, so the checkpoint needs no other data state).  Loss: mean token loss
(`training/step.py::gpt_forward_step`).
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional

import torch

from megatron_omni.config import RunConfig
from megatron_omni.models.init import init_weights_layout_invariant
from megatron_omni.models.llama import build_llama_chunks
from megatron_omni.training import flops
from megatron_omni.training.setup import TrainState
from megatron_omni.training.step import StepResult, gpt_forward_step, reduce_losses, run_schedule
from megatron_omni.training.tasks.base import StepSamples, num_microbatches
from megatron_omni.training.text_data import TextData, build_text_data, chunk_iterators


class TextTask:
    forward_step_func = staticmethod(gpt_forward_step)

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.data: Optional[TextData] = None
        self._iterators: Optional[List[Optional[Iterator]]] = None

    def build_model(self, params_dtype: torch.dtype) -> List[torch.nn.Module]:
        cfg = self.cfg
        chunks = build_llama_chunks(cfg.model, cfg.parallel, seq_length=cfg.data.seq_length, params_dtype=params_dtype)
        init_weights_layout_invariant(chunks, cfg.model, cfg.train.seed)
        return chunks

    def llm_flops_per_step(self) -> float:
        cfg = self.cfg
        return flops.llm_flops_per_step(cfg.model, cfg.train.global_batch_size, cfg.data.seq_length, tp=cfg.parallel.tp)

    def build_data(self, state: TrainState) -> None:
        self.data = build_text_data(self.cfg)

    def step_iterators(self, state: TrainState) -> List[Optional[Iterator]]:
        # One pass over the sampler's order from the (resumed) position: the same iterators every step.
        if self._iterators is None:
            self._iterators = self.data.train_iterators(self.cfg, len(state.model), state.consumed_samples)
        return self._iterators

    def step_metrics(self, state: TrainState, result: StepResult, step_time_s: float) -> Dict[str, Any]:
        return {}  # the loop's row (loss, lr, tokens/s, ...) is the whole story

    def step_samples(self, state: TrainState) -> StepSamples:
        cfg = self.cfg
        return self.data.step_samples(cfg, state.consumed_samples - cfg.train.global_batch_size,
                                      num_microbatches(cfg))

    @torch.no_grad()
    def validate(self, state: TrainState) -> Dict[str, Any]:
        """Mean token loss over the first train.eval_iters global batches of the validation split."""
        if self.data.valid is None:
            return {}
        cfg = self.cfg
        for chunk in state.model:
            chunk.eval()
        iterators = chunk_iterators(cfg, self.data.valid, len(state.model), consumed_samples=0)
        summed = torch.zeros(2, dtype=torch.float64)
        for _ in range(cfg.train.eval_iters):
            losses = run_schedule(
                state.model, iterators, num_microbatches=num_microbatches(cfg), seq_length=cfg.data.seq_length,
                micro_batch_size=cfg.train.micro_batch_size, forward_only=True,
                forward_step_func=self.forward_step_func,
            )
            summed += reduce_losses(losses).cpu()
        for chunk in state.model:
            chunk.train()
        return {"val_loss": (summed[0] / summed[1].clamp(min=1)).item()}

    def state_dict(self) -> Optional[dict]:
        return None  # the position is state.consumed_samples

    def load_state_dict(self, state: Optional[dict]) -> None:
        pass

    def before_checkpoint(self) -> None:
        pass
