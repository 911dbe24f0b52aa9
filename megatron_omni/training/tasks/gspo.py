"""`GSPOTask`: the RL stage (rollouts + GSPO updates, `rl/`) as a variant of the omni task.

The same omni model; the data is `rl/stage.py::GSPOData`, which generates each rollout batch with
the current policy, scores it and hands its mini-batches out step by step; the forward step runs
the omni model and the GSPO loss (`rl/forward_step.py`).
"""

from __future__ import annotations

from typing import Iterator, List, Optional

from megatron_omni.parallel.layout import unwrap
from megatron_omni.rl.forward_step import gspo_forward_step
from megatron_omni.rl.stage import GSPOData, build_gspo_data
from megatron_omni.training.setup import TrainState
from megatron_omni.training.tasks.base import StepSamples, num_microbatches
from megatron_omni.training.tasks.omni import OmniTask


class GSPOTask(OmniTask):
    forward_step_func = staticmethod(gspo_forward_step)
    data: Optional[GSPOData]

    def build_data(self, state: TrainState) -> None:
        self.data = build_gspo_data(self.cfg, unwrap(state.model[0]).vocab, len(state.model),
                                    num_microbatches(self.cfg))
        self._step_samples: StepSamples = []

    def step_iterators(self, state: TrainState) -> List[Optional[Iterator]]:
        iterators = self.data.step_iterators(state.step, state.model)
        planned = list(iterators[0])  # every chunk iterates the same microbatches
        self._step_samples = [(p.batch.modality, [i for row in p.batch.sample_ids or [] for i in row])
                              for p in planned]
        return [iter(planned) for _ in iterators]

    def step_samples(self, state: TrainState) -> StepSamples:
        return self._step_samples
