"""The training loop is task-agnostic: the built-in tasks and the profiler's wrapper implement
`Task`, the omni data sources implement `OmniSource`, and a third task the loop has never seen
trains through `pretrain` unchanged -- its loss is the mean token loss of its own microbatches
under the model, its metrics and validation fields reach metrics.jsonl, and its data position
round-trips through the checkpoint on resume.  One process, world of one."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_omni.config import load_config
from megatron_omni.data.omni_source import OmniSource
from megatron_omni.models.init import init_weights_layout_invariant
from megatron_omni.models.llama import build_llama_chunks
from megatron_omni.parallel.initialize import destroy_distributed
from megatron_omni.parallel.layout import unwrap
from megatron_omni.training.loop import pretrain
from megatron_omni.training.step import gpt_forward_step
from megatron_omni.training.tasks import Task, num_microbatches, task_for


def test_built_in_tasks_and_sources_implement_their_protocols():
    from megatron_omni.data.mock_omni import MockOmniData
    from megatron_omni.data.omni_loader import OmniLoader
    from megatron_omni.data.preference_stream import WithPreferences
    from megatron_omni.profiling.timers import TimedTask
    from megatron_omni.training.tasks.alignment import AlignmentTask
    from megatron_omni.training.tasks.gspo import GSPOTask
    from megatron_omni.training.tasks.omni import OmniTask
    from megatron_omni.training.tasks.text import TextTask

    configs = {"configs/tiny/llm.yaml": TextTask, "configs/tiny/omni_mock.yaml": OmniTask,
               "configs/tiny/stages/at.yaml": AlignmentTask, "configs/tiny/stages/gspo.yaml": GSPOTask}
    tasks = [task_for(load_config(path)) for path in configs]
    assert [type(task) for task in tasks] == list(configs.values())
    for task in (*tasks, TimedTask(tasks[0], timers=None)):
        assert isinstance(task, Task), type(task)
    members = [n for n in vars(OmniSource) if not n.startswith("_")]
    for source in (OmniLoader, WithPreferences):  # (properties and methods of the class)
        assert [n for n in members if not hasattr(source, n)] == [], source
    from megatron_omni.models.omni import omni_vocab

    omni = load_config("configs/tiny/omni_mock.yaml")
    mock = MockOmniData(omni.omni, omni_vocab(omni.model, omni.omni), seq_length=64, micro_batch_size=1, seed=0)
    assert isinstance(mock, OmniSource)
    assert not isinstance(object(), OmniSource)


class CopyTask:
    """A task `pretrain` has never seen: the tiny Llama on seeded random token rows."""

    forward_step_func = staticmethod(gpt_forward_step)

    def __init__(self, cfg):
        self.cfg = cfg
        self.drawn = 0  # microbatches handed out: the task's data position
        self.loaded = None
        self.reference_losses = []

    def build_model(self, params_dtype):
        chunks = build_llama_chunks(self.cfg.model, self.cfg.parallel, seq_length=self.cfg.data.seq_length,
                                    params_dtype=params_dtype)
        init_weights_layout_invariant(chunks, self.cfg.model, self.cfg.train.seed)
        return chunks

    def llm_flops_per_step(self):
        return 1.0

    def build_data(self, state):
        pass

    def _microbatch(self, index):
        b, s = self.cfg.train.micro_batch_size, self.cfg.data.seq_length
        rows = torch.randint(0, self.cfg.model.vocab_size, (b, s + 1), generator=torch.Generator().manual_seed(index))
        return {"tokens": rows[:, :-1], "labels": rows[:, 1:], "loss_mask": torch.ones(b, s),
                "position_ids": torch.arange(s).expand(b, s)}

    @torch.no_grad()
    def step_iterators(self, state):
        n = num_microbatches(self.cfg)
        batches = [self._microbatch(self.drawn + i) for i in range(n)]
        self.drawn += n
        model = unwrap(state.model[0])  # the reference: these rows' mean token loss under the current weights
        losses = [model(b["tokens"].cuda(), b["position_ids"].cuda(), None, labels=b["labels"].cuda()) for b in batches]
        self.reference_losses.append(float(sum(x.double().sum() for x in losses) / sum(x.numel() for x in losses)))
        return [iter(batches)]

    def step_metrics(self, state, result, step_time_s):
        return {"copy_reference_loss": self.reference_losses[-1]}

    def step_samples(self, state):
        return [("copy", [])] * num_microbatches(self.cfg)

    def validate(self, state):
        return {"copy_drawn": self.drawn}

    def state_dict(self):
        return {"drawn": self.drawn}

    def load_state_dict(self, state):
        self.loaded = state
        self.drawn = state["drawn"]

    def before_checkpoint(self):
        pass


def test_a_third_task_trains_through_pretrain_and_resumes(one_rank_world, tmp_path):
    overrides = [f"train.output_dir={tmp_path}", "data.seq_length=32", "train.micro_batch_size=2",
                 "train.global_batch_size=4", "train.eval_interval=2", "train.save_interval=null",
                 "optimizer.lr_warmup_steps=0", "train.log_interval=1"]
    cfg = load_config("configs/tiny/llm.yaml", [*overrides, "train.steps=2"])
    task = CopyTask(cfg)
    assert isinstance(task, Task)
    pretrain(cfg, task)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:  # the loop's loss is the task's microbatches' mean token loss under the model
        assert r["loss"] == pytest.approx(r["copy_reference_loss"], rel=1e-5)
    assert rows[0]["loss"] != rows[1]["loss"]  # the update happened
    assert "copy_drawn" not in rows[0] and rows[1]["copy_drawn"] == 4  # validation on train.eval_interval
    destroy_distributed()

    cfg = load_config("configs/tiny/llm.yaml", [*overrides, "train.steps=3", f"train.load={tmp_path}/checkpoints"])
    resumed = CopyTask(cfg)
    pretrain(cfg, resumed)
    assert resumed.loaded == {"drawn": 4}  # the data position the checkpoint saved
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[2]["loss"] == pytest.approx(rows[2]["copy_reference_loss"], rel=1e-5)
