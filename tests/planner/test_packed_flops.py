"""The planner prices packed omni rows as the THD path runs them: core attention of a row is the sum
of its samples' L_i^2, counted against torch's FLOP counter on the per-sample products (meta tensors:
shapes only), in the step FLOPs (MFU) and in the step time's compute."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_omni.planner import timing
from megatron_omni.planner.cluster import make_cluster
from megatron_omni.planner.jobs import load_job
from megatron_omni.planner.layout import Layout
from megatron_omni.planner.omni import MediaAssumptions
from megatron_omni.planner.search import evaluate
from megatron_omni.training import flops as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


def _counted_causal_core(model, length: int) -> float:
    """QK^T and P.V of one sample of `length` tokens, every query head, as torch counts them; halved
    for the causal mask as Megatron-LM counts it (S^2 / 2)."""
    h, d = model.num_attention_heads, model.head_dim
    q = torch.empty(1, h, length, d, device="meta")
    k_t = torch.empty(1, h, d, length, device="meta")
    v = torch.empty(1, h, length, d, device="meta")
    with FlopCounterMode(display=False) as counter:
        (q @ k_t) @ v
    return counter.get_total_flops() / 2


def test_row_segments():
    job = load_job("configs/m2omni_9b/stages/it2.yaml")
    w, s = job.omni, job.seq_len
    image = w.row_segments("image", s)
    assert sum(image) == s and len(image) == w.media_items("image", s) == 2  # 0.75 x 8192 / 2560 tokens an image
    assert w.row_segments("text", s) == [s]  # default: a text row is one sample (the upper bound)
    w = dataclasses.replace(w, media=MediaAssumptions(text_sample_tokens=3000))
    assert w.row_segments("text", s) == [3000, 3000, 2192]


def test_planner_flops_of_packed_rows_are_the_samples_sum():
    job = load_job("configs/m2omni_9b/stages/it2.yaml")  # the full model trains: 3 passes
    m, s, gbs = job.model, job.seq_len, job.global_batch
    layout, gpus = Layout(tp=4), 8
    n_micro = layout.num_microbatches(gpus, gbs)
    mix = timing.row_segment_mix(job, n_micro)
    assert {len(segments) for _, segments in mix} == {1, 2}  # text / video rows: one sample, image rows two

    # one row's core attention, per layer: the planner's formula == the counted per-sample products
    for _, segments in mix:
        assert timing._attention_core_forward_flops(job, F.sum_sq_lengths(segments)) == \
            sum(_counted_causal_core(m, n) for n in segments)

    # the step's model FLOPs (MFU): one unpacked S^2 row minus what packing saves, counted
    saved = sum(share * (_counted_causal_core(m, s) - sum(_counted_causal_core(m, n) for n in segments))
                for share, segments in mix)
    est = evaluate(job, layout, make_cluster("h100", gpus))
    unpacked = F.llm_flops_per_step(m, gbs, s, tp=layout.tp)
    assert est.llm_flops_per_token * gbs * s == pytest.approx(unpacked - gbs * m.num_layers * 3 * saved, rel=1e-12)
    assert saved > 0

    # the step time's compute: core attention (3 passes: no weights) + output layer, per TP rank
    _, other = timing.rank_flops_per_microbatch(job, layout, 0, n_micro)
    core = sum(share * sum(_counted_causal_core(m, n) for n in segments) for share, segments in mix)
    logits = 3 * F.logits_forward_flops(s, hidden_size=m.hidden_size, padded_vocab=m.padded_vocab_size(layout.tp))
    assert other * layout.tp == pytest.approx(m.num_layers * 3 * core + logits, rel=1e-12)
