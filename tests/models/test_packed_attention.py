"""THD packed attention (issue 14, models/packed_attention.py), one process: the per-segment backend
== the dense block-diagonal reference (outputs and gradients, GQA, causal and not, fp32 and bf16);
`PackedCoreAttention` in megatron's attention == megatron's DotProductAttention with the dense mask;
megatron's THD rotary with per-token M-RoPE freqs == models/rope.py's reference rotation; bad
configurations are one clear error.  The omni model's THD path against the dense one, at TP2 x PP2 +
sequence parallel: tests/training/test_omni_training.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_omni.config import load_config
from megatron_omni.config.loader import ConfigError
from megatron_omni.config.validate import validate
from megatron_omni.data.packing import packed_attention_mask
from megatron_omni.models.packed_attention import (
    PackedCoreAttention,
    available_backends,
    packed_attention,
    resolve_packed_attention,
)

REPO = Path(__file__).resolve().parents[2]
LENGTHS = [5, 9, 1, 2, 7]  # a one-token segment included


@pytest.fixture(scope="module")
def world():
    from megatron_omni.convert.mcore_io import megatron_world

    with megatron_world():
        yield


def _qkv(heads=4, groups=2, dim=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = sum(LENGTHS)
    q, k, v = (torch.randn(t, h, dim, generator=gen).to(dtype).requires_grad_() for h in (heads, groups, groups))
    cu = torch.tensor([0, *LENGTHS]).cumsum(0).to(torch.int32)
    return q, k, v, cu


def _masked_reference(q, k, v, cu, causal):
    """fp32 softmax(QK^T/sqrt(d)) V with data/packing.py's block-diagonal mask, written out."""
    t, h, d = q.shape
    rep = h // k.shape[1]
    kf, vf = (x.float().repeat_interleave(rep, dim=1) for x in (k, v))
    scores = torch.einsum("thd,shd->hts", q.float(), kf) / d ** 0.5
    masked = packed_attention_mask(cu.long(), 1, t)[0]  # causal block-diagonal, True = masked
    if not causal:
        seg = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
        masked = (seg[:, None] != seg[None, :])[None]
    return torch.einsum("hts,shd->thd", scores.masked_fill(masked, float("-inf")).softmax(-1), vf)


@pytest.mark.parametrize("causal", [True, False])
def test_per_segment_attention_equals_masked_reference(causal):
    assert set(available_backends(torch.device("cpu"))) == {"torch", "sdpa", "dense"}  # varlen needs CUDA
    grad = torch.randn(sum(LENGTHS), 4, 16, generator=torch.Generator().manual_seed(1))
    q, k, v, cu = _qkv()
    ref = _masked_reference(q, k, v, cu, causal)
    ref.backward(grad)
    ref_grads = [x.grad.clone() for x in (q, k, v)]
    for backend in ("torch", "sdpa", "dense"):
        for x in (q, k, v):
            x.grad = None
        out = packed_attention(q, k, v, cu, backend=backend, causal=causal)
        out.backward(grad)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        for g, r in zip((q.grad, k.grad, v.grad), ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_per_segment_attention_in_bf16():
    q, k, v, cu = _qkv(dtype=torch.bfloat16)
    out = packed_attention(q, k, v, cu, backend="torch")
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    ref = _masked_reference(q, k, v, cu, True)
    assert (out.float() - ref).abs().max() <= 2e-2 * ref.abs().max()
    for x in (q, k, v):
        assert x.grad is not None and x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()


def test_unknown_backend_and_varlen_off_cuda_are_clear_errors():
    q, k, v, cu = _qkv()
    with pytest.raises(ValueError, match="not one of"):
        packed_attention(q, k, v, cu, backend="flash")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        packed_attention(q, k, v, cu, backend="varlen")


def _attention_layer(core_attention, mask_type):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import build_module

    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                               kv_channels=16, add_bias_linear=False, normalization="RMSNorm",
                               apply_rope_fusion=False, attention_dropout=0.0, hidden_dropout=0.0)
    spec = get_gpt_layer_local_spec(normalization="RMSNorm").submodules.self_attention
    spec.params = {**spec.params, "attn_mask_type": mask_type}
    if core_attention is not None:
        spec.submodules.core_attention = core_attention
    torch.manual_seed(0)
    return build_module(spec, config=config, layer_number=1)


def test_core_attention_in_megatron_attention_equals_dense_mask(world):
    """megatron's SelfAttention with PackedCoreAttention on THD [T, 1, H] (rotary per token,
    padding_causal) == with its own DotProductAttention and the block-diagonal mask on [T, 1, H]."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_omni.models.rope import MRoPEEmbedding

    dense = _attention_layer(None, AttnMaskType.arbitrary)
    thd = _attention_layer(PackedCoreAttention, AttnMaskType.padding_causal)
    thd.load_state_dict(dense.state_dict())
    dense.config.mrope_section = thd.config.mrope_section = [2, 3, 3]
    t = sum(LENGTHS)
    cu = torch.tensor([0, *LENGTHS]).cumsum(0).to(torch.int32)
    x = torch.randn(t, 1, 64, generator=torch.Generator().manual_seed(2))
    positions = torch.randint(0, 20, (3, 1, t), generator=torch.Generator().manual_seed(3))
    freqs = MRoPEEmbedding(kv_channels=16, device="cpu")(positions, [2, 3, 3])  # [T, 1, 1, 16]: per token
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(LENGTHS),
                             max_seqlen_kv=max(LENGTHS))
    xd, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    saved_dense, saved_thd = [], []  # shapes of what autograd keeps for backward
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved_dense.append(tuple(s.shape)) or s, lambda s: s):
        out_d, _ = dense(xd, attention_mask=packed_attention_mask(cu, 1, t), rotary_pos_emb=freqs)
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved_thd.append(tuple(s.shape)) or s, lambda s: s):
        out_t, _ = thd(xt, attention_mask=None, rotary_pos_emb=freqs, packed_seq_params=packed)
    # no T x T tensor is kept on the THD path; the dense path keeps its scores
    assert any(shape[-2:] == (t, t) for shape in saved_dense)
    assert not any(shape.count(t) > 1 for shape in saved_thd), saved_thd
    assert out_t.shape == out_d.shape == (t, 1, 64)
    torch.testing.assert_close(out_t, out_d, rtol=1e-5, atol=1e-5)
    out_d.square().sum().backward()
    out_t.square().sum().backward()
    torch.testing.assert_close(xt.grad, xd.grad, rtol=1e-5, atol=1e-5)
    for (name, p_d), p_t in zip(dense.named_parameters(), thd.parameters()):
        torch.testing.assert_close(p_t.grad, p_d.grad, rtol=1e-5, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match="runs packed THD inputs"):
        thd(x, attention_mask=None, rotary_pos_emb=freqs)


def test_thd_rotary_equals_reference_rotation_per_token(world):
    """megatron's THD rotary (rope_utils, apply_rope_fusion off) with the per-token freqs of the
    packed stream (freqs.size(0) == cu_seqlens[-1]) == its bshd rotation of every row (the path
    tests/models/test_mrope.py checks against HF)."""
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.transformer import TransformerConfig

    from megatron_omni.models.rope import MRoPEEmbedding

    B, S, H, D, section = 2, 12, 3, 16, [2, 3, 3]
    cu = torch.tensor([0, 5, 12, 16, 24], dtype=torch.int32)  # rows of 12: segments 5+7, 4+8
    positions = torch.randint(0, 30, (3, B, S), generator=torch.Generator().manual_seed(4))
    x = torch.randn(B, S, H, D, generator=torch.Generator().manual_seed(5))
    rotary = MRoPEEmbedding(kv_channels=D, device="cpu")
    config = TransformerConfig(num_layers=1, hidden_size=48, num_attention_heads=3, apply_rope_fusion=False)
    reference = apply_rotary_pos_emb(x.transpose(0, 1), rotary(positions, section), config)
    freqs = rotary(positions.reshape(3, 1, B * S), section)  # the THD stream's
    assert freqs.shape[0] == int(cu[-1])
    thd = apply_rotary_pos_emb(x.reshape(B * S, H, D), freqs, config, cu_seqlens=cu,
                               cp_group=parallel_state.get_context_parallel_group())
    torch.testing.assert_close(thd.view(B, S, H, D).transpose(0, 1), reference, rtol=0, atol=1e-6)
    # control: the restart-at-0 mapping (freqs of one sequence) is not M-RoPE per token
    restart = apply_rotary_pos_emb(x.reshape(B * S, H, D), freqs[:S], config, cu_seqlens=cu,
                                   cp_group=parallel_state.get_context_parallel_group())
    assert (restart.view(B, S, H, D).transpose(0, 1) - reference).abs().max() > 1e-2


def test_bad_packed_attention_configs_are_one_clear_error():
    cfg = load_config(str(REPO / "configs/tiny/omni_mock.yaml"), ["model.packed_attention=flash"])
    with pytest.raises(ConfigError, match=r"packed_attention='flash' is not one of \['auto', 'te', 'torch', 'dense'\]"):
        validate(cfg, 1)
    cfg = load_config(str(REPO / "configs/tiny/omni_mock.yaml"), ["model.packed_attention=te"])
    with pytest.raises(ConfigError, match="model.packed_attention=te needs Transformer Engine"):
        validate(cfg, 1)
    with pytest.raises(RuntimeError, match="model.packed_attention=te but the model is not built from Transformer"):
        resolve_packed_attention("te", False)
    assert resolve_packed_attention("auto", False) == "torch"
    assert resolve_packed_attention("auto", True) == "te"
    assert resolve_packed_attention("dense", False) == "dense"
