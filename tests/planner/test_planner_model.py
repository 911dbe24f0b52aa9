"""Planner arithmetic: parameter/memory accounting by hand, legality, anchors, ranking."""

from __future__ import annotations

import dataclasses
import os

import pytest
import yaml

from megatron_omni.config.loader import ConfigError, from_dict
from megatron_omni.config.schema import ModelConfig
from megatron_omni.planner import anchors as A
from megatron_omni.planner.cluster import GIB, make_cluster
from megatron_omni.planner.layout import Job, Layout, check_layout, parse_layout
from megatron_omni.planner.memory import (
    MemoryAssumptions,
    estimate_memory,
    in_flight_layers,
    param_counts,
)
from megatron_omni.planner.search import evaluate, search
from megatron_omni.planner.timing import Efficiency

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load(name: str) -> ModelConfig:
    with open(os.path.join(ROOT, "configs", "model", f"{name}.yaml")) as f:
        return from_dict(ModelConfig, yaml.safe_load(f))


# ---------------------------------------------------------------- memory by hand


def tiny_params_by_hand(tp: int):
    """tiny_llm.yaml written out: h=64, ffn=176, 4 heads x 16, 2 KV groups, 4 layers,
    vocab 2000 padded to a multiple of 64*tp, untied embeddings."""
    h, f, layers, q, kv = 64, 176, 4, 4 * 16, 2 * 16
    vocab = -(-2000 // (64 * tp)) * (64 * tp)
    linear = h * (q + 2 * kv) + q * h + h * 2 * f + f * h  # QKV, proj, fc1 [gate; up], fc2
    norms = 2 * h
    total = layers * (linear + norms) + 2 * vocab * h + h  # + embedding, output layer, final norm
    per_gpu = layers * (linear // tp + norms) + 2 * (vocab * h // tp) + h  # norms replicated over TP
    return total, per_gpu


def test_tiny_param_count_matches_hand_count():
    m = load("tiny_llm")
    for tp in (1, 2, 4):
        total, _ = tiny_params_by_hand(tp)
        assert param_counts(m, tp).total == total
    assert param_counts(m, 1).total == 4 * (8192 + 4096 + 22528 + 11264 + 128) + 2 * 2048 * 64 + 64


def test_model_states_tiny_tp2_dp2_distributed_optimizer():
    m = load("tiny_llm")
    job = Job(m, seq_len=256, global_batch=8)
    layout = Layout(tp=2)  # 4 GPUs -> dp = 2
    check_layout(job, layout, 4)
    _, n = tiny_params_by_hand(tp=2)
    mem = estimate_memory(job, layout, 4, MemoryAssumptions(grad_fp32=True))
    assert mem.params == n
    # bf16 weights 2 + fp32 grads 4 + (fp32 master 4 + Adam 8) / dp  (Megatron docs: 6 + 12/d)
    assert mem.weights_gib * GIB == pytest.approx(2 * n)
    assert mem.grads_gib * GIB == pytest.approx(4 * n)
    assert mem.optimizer_gib * GIB == pytest.approx(12 * n / 2)
    assert (mem.weights_gib + mem.grads_gib + mem.optimizer_gib) * GIB == pytest.approx((6 + 12 / 2) * n)
    # bf16 gradient buffer: 4 + 16/d
    bf = estimate_memory(job, layout, 4, MemoryAssumptions(grad_fp32=False))
    assert (bf.weights_gib + bf.grads_gib + bf.optimizer_gib) * GIB == pytest.approx((4 + 16 / 2) * n)


def test_activations_tiny_by_hand():
    m = load("tiny_llm")
    job = Job(m, seq_len=256, global_batch=4)
    layout = Layout(micro_batch=2)  # 1 GPU, pp=1: one microbatch in flight, all 4 layers
    mem = estimate_memory(job, layout, 1, MemoryAssumptions())
    h, f, kv, vocab, tokens = 64, 176, 32, 2048, 2 * 256
    per_layer_token = 12 * h + 4 * kv + 6 * f  # norms, GEMM inputs, Q, K/V, O, SwiGLU (bf16)
    logits = 4 * h + 6 * vocab
    assert mem.activations_gib * GIB == pytest.approx(tokens * (4 * per_layer_token + logits))
    # Full recompute keeps each layer's input (2h) plus one layer's working set.
    full = estimate_memory(job, dataclasses.replace(layout, recompute="full"), 1)
    assert full.activations_gib * GIB == pytest.approx(tokens * (4 * 2 * h + per_layer_token + logits))


def test_pipeline_in_flight_microbatches():
    m = load("llama3_70b")
    # 1F1B: rank 0 keeps pp microbatches of L/pp layers = L layers' worth; the last rank one.
    assert in_flight_layers(m, Layout(pp=8), 128, 0) == 80
    assert in_flight_layers(m, Layout(pp=8), 128, 7) == 10
    assert in_flight_layers(m, Layout(pp=8), 4, 0) == 40  # fewer microbatches than stages
    # Interleaved: the (1 + (pp-1)/(pp*vpp)) factor of Megatron-LM's theoretical memory.
    assert in_flight_layers(m, Layout(pp=8, vpp=5), 128, 0) == pytest.approx(80 * (1 + 7 / 40))


def test_sequence_and_context_parallel_divide_activations():
    m = load("llama3_70b")
    job = Job(m, 8192, 64)
    base = estimate_memory(job, Layout(tp=8, pp=8), 64).activations_gib
    cp2 = estimate_memory(job, Layout(tp=8, pp=4, cp=2), 64).activations_gib
    # cp halves tokens per rank; pp=4 doubles layers per rank but not the L layers in flight.
    assert cp2 == pytest.approx(base / 2, rel=0.05)


# ---------------------------------------------------------------- legality


@pytest.mark.parametrize(
    "layout, gpus, gbs, message",
    [
        (Layout(tp=3), 48, 96, "num_attention_heads=64 is not divisible by parallel.tp=3"),
        (Layout(tp=4, pp=8, vpp=3), 64, 256, "num_layers=80 is not divisible by parallel.pp*parallel.vpp=24"),
        (Layout(tp=8, pp=1, micro_batch=4), 64, 12, "global_batch_size=12 is not divisible"),
        (Layout(tp=8, pp=4, vpp=2), 64, 20, "multiple of parallel.pp=4"),
        (Layout(tp=8, cp=3), 48, 48, "divisible by 2*cp=6"),
    ],
)
def test_check_layout_rejects_what_megatron_rejects(layout, gpus, gbs, message):
    job = Job(load("llama3_70b"), 8192, gbs)
    with pytest.raises(ConfigError, match=message.replace("*", r"\*").replace("(", r"\(")):
        check_layout(job, layout, gpus)


def test_context_parallel_layouts_are_legal_without_te_here():
    # validate() refuses cp>1 on a machine without Transformer Engine; the planner plans for
    # a GPU cluster, so that environment check must not reject CP layouts.
    check_layout(Job(load("llama3_70b"), 8192, 128), Layout(tp=4, pp=4, vpp=5, cp=2), 64)


def test_parse_layout():
    assert parse_layout("tp=4,pp=8,vpp=5", 64) == Layout(tp=4, pp=8, vpp=5)
    assert parse_layout("tp=2, cp=2, mbs=2, recompute=full, dp=16", 64) == Layout(
        tp=2, cp=2, micro_batch=2, recompute="full")
    for bad, msg in [("tp=4,xx=1", "unknown key 'xx'"), ("tp=four", "not an integer"),
                     ("tp", "key=value"), ("recompute=some", "recompute='some'"),
                     ("tp=4,dp=3", "dp=3 but gpus/"), ("", "empty"), ("tp=0", ">= 1")]:
        with pytest.raises(ConfigError, match=msg):
            parse_layout(bad, 64)


# ---------------------------------------------------------------- anchors and ranking


def test_calibration_anchors_reproduce_the_fit():
    """A fit, not evidence: `Efficiency` was fitted on these two rows (1633 tok/s/GPU, 734 TFLOP/s/GPU
    FP8; 54 % MFU BF16), so this only checks the rounded constants still reproduce them.  The
    held-out rows (next test) are the evidence that the model transfers."""
    rows = A.compare_all()
    calibration = [r for r in rows if r["calibration"]]
    assert len(calibration) == 2
    for r in calibration:
        assert r["within_tolerance"], r
        assert abs(r["ratio"] - 1) <= r["tolerance"]
    fp8 = next(r for r in calibration if r["metric"] == "tokens_per_s_per_gpu")
    assert fp8["predicted"] == pytest.approx(1633, rel=0.10)
    assert fp8["predicted_tflops_per_gpu"] == pytest.approx(734, rel=0.10)
    assert fp8["fits"]  # NVIDIA runs this layout on 80 GB H100s
    bf16 = next(r for r in calibration if r["metric"] == "mfu")
    assert bf16["predicted"] == pytest.approx(0.54, rel=0.10)


def test_held_out_anchors_within_their_stated_tolerance():
    """The evidence: measured runs that were not used for the fit (other batch sizes, layouts, model
    sizes, software stacks), each predicted within its stated tolerance (15 %)."""
    held_out = [r for r in A.compare_all() if not r["calibration"]]
    assert len(held_out) >= 3
    for r in held_out:
        assert r["within_tolerance"], r
        assert abs(r["ratio"] - 1) <= r["tolerance"]


def test_efficiency_constants_are_the_rounded_fit():
    """A fit: the constants in timing.Efficiency are the calibration anchors solved and rounded."""
    assert A.fitted_efficiency("bf16") == pytest.approx(Efficiency().bf16, abs=0.01)
    assert A.fitted_efficiency("fp8") == pytest.approx(Efficiency().fp8, abs=0.01)


def test_bubble_is_p_minus_1_over_v_m():
    job = Job(load("llama3_70b"), 8192, 256, "fp8")
    est = evaluate(job, Layout(tp=4, pp=8, vpp=5), make_cluster("h100", 64))
    t = est.time
    per_micro = (t.compute_s + t.tp_s + t.cp_s + t.pp_s) / t.num_microbatches
    assert t.num_microbatches == 128
    assert t.bubble_s == pytest.approx(7 / 5 * per_micro)
    assert t.bubble_s / (t.compute_s + t.tp_s + t.cp_s + t.pp_s) == pytest.approx(7 / (5 * 128))


def test_ranking_is_monotonic_and_feasible_fits():
    cluster = make_cluster("h100", 64)
    result = search(Job(load("llama3_70b"), 8192, 256, "fp8"), cluster)
    assert result.feasible and result.infeasible
    speeds = [e.tokens_per_s_per_gpu for e in result.feasible]
    assert speeds == sorted(speeds, reverse=True)
    limit = cluster.gpu.memory_gib * 0.95
    assert all(e.memory.total_gib <= limit for e in result.feasible)
    assert all(e.memory.total_gib > limit for e in result.infeasible)
    assert {e.layout.ep for e in result.feasible} == {1}  # dense model


def test_llama3_8b_fits_on_8_h100_bf16():
    result = search(Job(load("llama3_8b"), 8192, 128, "bf16"), make_cluster("h100", 8))
    assert result.feasible
    best = result.feasible[0]
    assert best.memory.total_gib < 80
    assert 0.3 < best.mfu < 0.7


def test_llama3_70b_on_8_gpus_bf16_does_not_fit_without_recompute():
    result = search(Job(load("llama3_70b"), 8192, 128, "bf16"), make_cluster("h100", 8))
    assert not [e for e in result.feasible if e.layout.recompute == "none"]
    # 70B x (6 + 12/1) bytes of model state alone is ~150 GiB per GPU on 8 GPUs.
    assert min(e.memory.total_gib for e in result.infeasible) > 80
