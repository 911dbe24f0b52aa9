"""FLOP accounting: Megatron-LM's formula, anchored to published numbers and
cross-checked against torch's FlopCounterMode on a real HF Llama."""

import os

import pytest
import torch
import yaml

from megatron_omni.config.loader import from_dict
from megatron_omni.config.schema import ModelConfig
from megatron_omni.training import flops as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_model(name: str) -> ModelConfig:
    with open(os.path.join(ROOT, "configs", "model", f"{name}.yaml")) as f:
        return from_dict(ModelConfig, yaml.safe_load(f))


def test_padded_vocab_size():
    assert ModelConfig(vocab_size=128256, make_vocab_size_divisible_by=128).padded_vocab_size() == 128256  # 1002 * 128
    assert ModelConfig(vocab_size=128256, make_vocab_size_divisible_by=128).padded_vocab_size(tp=4) == 128512  # multiple of 512
    assert ModelConfig(vocab_size=2000, make_vocab_size_divisible_by=64).padded_vocab_size() == 2048
    assert ModelConfig(vocab_size=50257, make_vocab_size_divisible_by=128).padded_vocab_size(tp=1) == 50304


def test_llama3_70b_anchor():
    # Megatron-Bridge's published Llama-3-70B pretraining numbers at seq 8192:
    # 734 TFLOP/s/GPU at 1633 tokens/s/GPU -> 734e12 / 1633 = 4.495e11 FLOPs/token.
    # Reproduced exactly only with Megatron-LM's causal halving of core attention
    # (without it: 4.814e11).  Vocab padding barely matters: 128256 is already a
    # multiple of 128 (tp=1) and tp=4 pads it to 128512 (+1.3e7 FLOPs/token).
    m = load_model("llama3_70b")
    fpt = F.flops_per_token(m, 8192)
    assert f"{fpt:.2e}" == "4.49e+11"
    assert fpt == pytest.approx(734e12 / 1633, rel=2e-3)
    assert fpt == 449222541312.0  # exact value of the formula, tp=1
    assert F.flops_per_token(m, 8192, tp=4) - fpt == 6 * 8192 * (128512 - 128256)
    # Non-causal counting would disagree with the anchor by 7 %.
    full = 3 * F.llm_forward_flops(m, [8192], causal=False) / 8192
    assert full == pytest.approx(4.814e11, rel=1e-3)
    # Per step = per-token x tokens.
    assert F.llm_flops_per_step(m, 128, 8192) == pytest.approx(fpt * 128 * 8192, rel=1e-12)


def test_llama3_8b_hand_count():
    m = load_model("llama3_8b")
    s, h, f, q, kv, v = 4096, 4096, 14336, 4096, 1024, 128256
    per_token_fwd = 32 * (2 * h * (q + 2 * kv) + 2 * q * h + 2 * 2 * q * s / 2 + 2 * 3 * h * f) + 2 * h * v
    assert F.flops_per_token(m, s) == pytest.approx(3 * per_token_fwd, rel=1e-12)


def _hf_tiny_llama(m: ModelConfig):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=m.padded_vocab_size(),
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups,
        head_dim=m.head_dim,
        max_position_embeddings=m.max_position_embeddings,
        rope_theta=m.rotary_base,
        rms_norm_eps=m.norm_epsilon,
        tie_word_embeddings=m.tie_word_embeddings,
        # eager = explicit matmuls for QK^T and AV, which FlopCounterMode counts
        # (full S x S, mask applied afterwards); CPU sdpa is not counted.
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def test_matches_flop_counter_on_hf_llama():
    from torch.utils.flop_counter import FlopCounterMode

    m = load_model("tiny_llm")
    model = _hf_tiny_llama(m).eval()
    batch, seq = 2, 128
    ids = torch.randint(0, m.vocab_size, (batch, seq))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids)
    measured = counter.get_total_flops()
    ours = batch * F.llm_forward_flops(m, [seq], causal=False)
    assert measured == pytest.approx(ours, rel=0.01)
    # Causal halving removes exactly half of the core-attention matmuls.
    core_full = m.num_layers * batch * 2 * 2 * m.num_attention_heads * m.head_dim * seq**2
    assert ours - batch * F.llm_forward_flops(m, [seq]) == pytest.approx(core_full / 2)


def test_backward_is_twice_forward_on_hf_llama():
    from torch.utils.flop_counter import FlopCounterMode

    m = load_model("tiny_llm")
    model = _hf_tiny_llama(m).train()
    ids = torch.randint(0, m.vocab_size, (1, 64))
    with FlopCounterMode(display=False) as counter:
        model(ids, labels=ids).loss.backward()
    assert counter.get_total_flops() == pytest.approx(3 * F.llm_forward_flops(m, [64], causal=False), rel=0.01)


def test_frozen_llm_skips_weight_gradients_on_hf_llama():
    """A frozen LLM fed trainable inputs (M2-omni PT-1: the connectors train) runs forward + dgrad
    of every weight GEMM and the full backward of core attention: what FlopCounterMode measures
    equals llm_flops(weight_grads=False)."""
    from torch.utils.flop_counter import FlopCounterMode

    m = load_model("tiny_llm")
    model = _hf_tiny_llama(m).train().requires_grad_(False)
    ids = torch.randint(0, m.vocab_size, (1, 64))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)  # the connector's output
    with FlopCounterMode(display=False) as counter:
        model(inputs_embeds=embeds, labels=ids).loss.backward()
    measured = counter.get_total_flops()
    assert measured == pytest.approx(F.llm_flops(m, [64], weight_grads=False, causal=False), rel=0.01)
    assert measured < 0.8 * F.llm_flops(m, [64], causal=False)


def test_packing_uses_sum_of_squares():
    m = load_model("llama3_8b")
    S = 8192
    one = F.llm_flops(m, [S])
    two = F.llm_flops(m, [S // 2, S // 2])
    assert two < one
    # Only the core-attention term differs: S^2 -> 2 (S/2)^2 = S^2 / 2.
    q = m.num_attention_heads * m.head_dim
    core = lambda ss: 3 * m.num_layers * 2 * 2 * q * ss / 2
    assert one - two == pytest.approx(core(S * S) - core(2 * (S // 2) ** 2), rel=1e-12)
    # Linear terms (projections, MLP, logits) depend only on the token count.
    linear = lambda lens: F.llm_flops(m, lens) - core(sum(n * n for n in lens))
    assert linear([S // 2, S // 2]) == pytest.approx(linear([S]), rel=1e-12)
    assert linear([1000, 3000, 4192]) == pytest.approx(linear([S]), rel=1e-12)
    # Order of samples in a row is irrelevant; a row of one sample = the plain sequence.
    assert F.llm_flops(m, [100, 7000]) == F.llm_flops(m, [7000, 100])
    assert F.llm_flops_per_step(m, 4, S) == 4 * one
    with pytest.raises(ValueError):
        F.llm_flops(m, [])


def test_components_compose():
    m = load_model("tiny_llm")
    lens = [30, 50]
    kw = dict(hidden_size=m.hidden_size)
    total = m.num_layers * (
        F.attention_forward_flops(
            80, 30**2 + 50**2, num_attention_heads=4, num_query_groups=2, head_dim=16, **kw
        )
        + F.mlp_forward_flops(80, ffn_hidden_size=176, **kw)
    ) + F.logits_forward_flops(80, padded_vocab=2048, **kw)
    assert F.llm_forward_flops(m, lens) == total
    assert F.llm_flops(m, lens) == 3 * total
    # SwiGLU = 3 matrices, plain MLP = 2.
    assert F.mlp_forward_flops(10, hidden_size=4, ffn_hidden_size=8) == 2 * 10 * 4 * 8 * 3
    assert F.mlp_forward_flops(10, hidden_size=4, ffn_hidden_size=8, gated=False) == 2 * 10 * 4 * 8 * 2


def test_mfu():
    assert F.mfu(734.0, "h100", "bf16") == pytest.approx(734.0 / 989.0)
    assert F.mfu(734.0, "h100", "bf16") == pytest.approx(0.742, abs=1e-3)
    assert F.mfu(989.5, "h200", "fp8") == pytest.approx(0.5, abs=1e-3)
    assert F.mfu(156.0, "a100", "bf16") == pytest.approx(0.5)
    assert F.mfu(100.0, "cpu", "bf16") is None
    assert F.mfu(100.0, "unknown", "bf16") is None
    assert F.mfu(100.0, "a100", "fp8") is None
    assert F.PEAK_TFLOPS["h200"] == F.PEAK_TFLOPS["h100"]


def test_detect_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert F.detect_device() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, want in [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("Tesla V100-SXM2-32GB", "unknown"),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, n=name: n)
        assert F.detect_device() == want
