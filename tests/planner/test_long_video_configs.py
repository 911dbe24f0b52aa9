"""The 9B / 72B instruction-tuning and alignment stages with video (IT-2, IT-3, AT): each config
validates as the trainer validates it, its sequence length holds a clip of the stage's Table 2
frame limit plus a row's text, and the planner accepts and fits its layout on the cluster the
config names (one node for 9B, 16 for 72B)."""

from __future__ import annotations

import os

import pytest

from megatron_omni.config import load_config
from megatron_omni.config.validate import validate
from megatron_omni.data.blend import load_blend
from megatron_omni.data.media.geometry import cell_size, plan_video
from megatron_omni.planner.cluster import make_cluster
from megatron_omni.planner.jobs import load_job
from megatron_omni.planner.layout import Layout, check_layout
from megatron_omni.planner.search import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPUS = {"m2omni_9b": 8, "m2omni_72b": 128}
# Text of a video row: system prompt, question, answer and the chat template around them (an
# assumption: a video QA answer of a few sentences is well under it).
ROW_TEXT_TOKENS = 2048
# Table 2 "max video frames"
FRAMES = {"it2": 16, "it3": 128, "at": 128}


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)  # stage configs name their blends relative to the repository


def _clip_tokens(vision, frames: int, budget: int, height: int, width: int) -> int:
    """LLM tokens of a `frames`-frame clip of height x width under `budget`, as the loader sizes it."""
    plan = plan_video(frames * 4, 30.0, height, width, vision=vision, max_frames=frames, max_tokens=budget)
    assert plan.num_frames == frames
    c = cell_size(vision)
    return plan.num_frames // vision.temporal_patch_size * (plan.height // c) * (plan.width // c)


@pytest.mark.parametrize("size", sorted(GPUS))
@pytest.mark.parametrize("stage", sorted(FRAMES))
def test_long_video_stage_config(size, stage):
    path = f"configs/{size}/stages/{stage}.yaml"
    # transformer_impl=auto: the configs ask for TE layers, which this CPU machine lacks (the check is
    # the layout's, not this machine's); auto = te on the cluster, the same rules.
    cfg = load_config(path, ["model.transformer_impl=auto"])
    validate(cfg, GPUS[size])
    assert cfg.model.packed_attention == "auto"

    blend = load_blend(cfg.data.omni_blend)
    assert blend.max_video_frames == FRAMES[stage]
    budget = blend.max_video_tokens or blend.max_image_tokens  # the loader's clip budget
    assert cfg.data.seq_length >= budget + ROW_TEXT_TOKENS  # any clip of the stage + a row's text
    if FRAMES[stage] == 128:  # the YAML comment's numbers: 720p, 182 tokens a frame
        assert _clip_tokens(cfg.omni.vision, 128, budget, 720, 1280) == 128 * 182
        assert cfg.data.seq_length - 128 * 182 == 9472

    p = cfg.parallel
    if size == "m2omni_72b" and stage == "it3":
        assert p.cp > 1  # the long rows of a full-model stage need context parallelism on 16 nodes
    job = load_job(path)
    layout = Layout(tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, first_stage_layers=p.first_stage_num_layers,
                    micro_batch=cfg.train.micro_batch_size)
    check_layout(job, layout, GPUS[size])
    estimate = evaluate(job, layout, make_cluster("h100", GPUS[size]))
    assert estimate.fits, estimate.memory.as_dict()
