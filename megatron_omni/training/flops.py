"""Model FLOPs accounting, counted the way Megatron-LM counts them.

Provenance: `num_floating_point_operations()` / `transformer_flops()` in
Megatron-LM's `megatron/training/training.py` (dense GQA transformer branch).
The facts that formula encodes, and that this module reproduces:

* every GEMM of an ``m x k`` by ``k x n`` product costs ``2*m*n*k`` FLOPs;
* training = forward + backward = 3 x forward (forward, dgrad, wgrad);
* attention projections: Q is ``heads * head_dim`` wide, K and V are each
  ``num_query_groups * head_dim`` wide (GQA), the output projection maps
  ``heads * head_dim`` back to ``hidden_size``;
* core attention (``Q K^T`` and ``softmax(.) V``) costs ``2 * 2 * q_width * S^2``
  per layer for a full mask, and Megatron-LM halves it for the causal mask
  ("only half of the mask is non-zero"): ``S^2 / 2``, not ``S(S+1)/2``;
* MLP: SwiGLU has three ``hidden x ffn`` matrices (gate, up, down);
* output layer: ``hidden x padded_vocab`` GEMM on every token, with the vocab
  padded to a multiple of ``make_vocab_size_divisible_by * tp``;
* not counted: embedding lookup, norms, RoPE, softmax, activations, the loss.

Packed rows: causal attention never crosses a sample boundary, so a row holding
samples of lengths ``L_1..L_n`` costs ``sum(L_i^2)`` in the core-attention term
instead of ``(sum L_i)^2``; every other term is linear in the token count.

Extension points: the model total is the sum of one function per component
(`attention_forward_flops`, `mlp_forward_flops`, `logits_forward_flops`), each
a forward count.  A vision/audio encoder adds its own layers' forward FLOPs
(non-causal attention: ``causal=False``) to `llm_forward_flops`.

MoE (``model.moe``, `decoder_mlp_forward_flops`): only computed experts count -- the
shared expert on every token, plus ``k x (1 - null rate)`` routed experts per token
(`MoEConfig.routed_experts_per_token`: null selections are never dispatched, so they cost
nothing; with top-p routing k is an upper bound).  The router GEMM (``2 h (E+N)`` per
token) is not counted, like the other small terms above.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

from megatron_omni.config.schema import ModelConfig

# Forward, backward dgrad, backward wgrad: each GEMM runs three times.
FWD_BWD_FACTOR = 3
# Multiply + add per multiply-accumulate.
FMA_FACTOR = 2

# Dense (no 2:4 sparsity) tensor-core peaks in TFLOP/s per GPU, SXM parts.
# H200 has the same compute as H100 SXM (only memory differs).  `None` = no
# meaningful peak (CPU), which makes `mfu` return None.
PEAK_TFLOPS: Dict[str, Optional[Dict[str, float]]] = {
    "h100": {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0, "tf32": 494.0, "fp32": 67.0},
    "h200": {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0, "tf32": 494.0, "fp32": 67.0},
    "a100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "b200": {"bf16": 2250.0, "fp16": 2250.0, "fp8": 4500.0, "tf32": 1100.0, "fp32": 75.0},
    "cpu": None,
    "unknown": None,
}


# ---------------------------------------------------------------- components
# Each returns *forward* FLOPs of one layer (or of the output layer) for a set of
# samples; multiply by FWD_BWD_FACTOR for training.


def attention_forward_flops(
    num_tokens: int,
    sum_sq_lengths: int,
    *,
    hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int,
    head_dim: int,
    causal: bool = True,
) -> float:
    """Forward FLOPs of one self-attention layer (projections + core attention).

    ``num_tokens`` = sum of sample lengths, ``sum_sq_lengths`` = sum of their
    squares (``S^2`` for one unpacked sequence).  ``causal`` halves the core
    term as Megatron-LM does; an encoder with a full mask passes ``causal=False``.
    """
    q = num_attention_heads * head_dim
    kv = num_query_groups * head_dim
    projections = FMA_FACTOR * num_tokens * hidden_size * (q + 2 * kv)  # fused QKV
    out_proj = FMA_FACTOR * num_tokens * q * hidden_size
    core = FMA_FACTOR * 2 * q * sum_sq_lengths  # QK^T and (QK^T)V
    if causal:
        core /= 2
    return float(projections + core + out_proj)


def mlp_forward_flops(
    num_tokens: int, *, hidden_size: int, ffn_hidden_size: int, gated: bool = True
) -> float:
    """Forward FLOPs of one dense MLP: 3 matrices for SwiGLU, 2 without a gate.

    MoE: pass ``ffn_hidden_size = moe_ffn_hidden_size * topk`` (+ a separate call
    for shared experts); the router GEMM is negligible and not counted (as in
    Megatron-LM).
    """
    num_matrices = 3 if gated else 2
    return float(FMA_FACTOR * num_tokens * hidden_size * ffn_hidden_size * num_matrices)


def mlp_hidden_per_token(model: ModelConfig) -> float:
    """SwiGLU inner width one token actually computes per layer: the dense MLP's, or for MoE
    the shared expert's plus the expected routed experts' (see the module docstring)."""
    moe = model.moe
    if moe is None:
        return float(model.ffn_hidden_size)
    return float(moe.shared_expert_ffn_hidden_size or 0) + moe.ffn_hidden_size * moe.routed_experts_per_token()


def decoder_mlp_forward_flops(model: ModelConfig, num_tokens: int) -> float:
    """Forward FLOPs of one decoder layer's MLP (dense, or MoE counting computed experts only)."""
    return mlp_forward_flops(num_tokens, hidden_size=model.hidden_size, ffn_hidden_size=mlp_hidden_per_token(model))


def logits_forward_flops(num_tokens: int, *, hidden_size: int, padded_vocab: int) -> float:
    """Forward FLOPs of the output layer on every token (tied or not: same GEMM)."""
    return float(FMA_FACTOR * num_tokens * hidden_size * padded_vocab)


# ---------------------------------------------------------------- model totals


def _check_lengths(seq_lengths: Sequence[int]) -> None:
    if len(seq_lengths) == 0 or any(int(n) < 0 for n in seq_lengths):
        raise ValueError(f"seq_lengths must be non-empty and non-negative, got {seq_lengths!r}")


def sum_sq_lengths(seq_lengths: Sequence[int]) -> int:
    """The core-attention size of a row of samples: sum L_i^2 (attention stays inside a sample; an
    unpacked sequence of S tokens is [S]).  The THD paths compute exactly these products; the dense
    block-diagonal mask computes S^2 but only these are model FLOPs."""
    return sum(int(n) * int(n) for n in seq_lengths)


def llm_forward_flops(
    model: ModelConfig, seq_lengths: Sequence[int], *, tp: int = 1, causal: bool = True
) -> float:
    """Forward FLOPs of the decoder for one row whose samples have ``seq_lengths``.

    ``causal=False`` counts the full attention mask (what a generic FLOP counter
    sees for a plain matmul attention); training accounting uses ``causal=True``.
    """
    _check_lengths(seq_lengths)
    num_tokens = sum(int(n) for n in seq_lengths)
    sum_sq = sum_sq_lengths(seq_lengths)
    per_layer = attention_forward_flops(
        num_tokens,
        sum_sq,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        head_dim=model.head_dim,
        causal=causal,
    ) + decoder_mlp_forward_flops(model, num_tokens)
    vocab = model.padded_vocab_size(tp)
    logits = logits_forward_flops(num_tokens, hidden_size=model.hidden_size, padded_vocab=vocab)
    return model.num_layers * per_layer + logits


def llm_flops(model: ModelConfig, seq_lengths: Sequence[int], *, tp: int = 1, weight_grads: bool = True,
              causal: bool = True) -> float:
    """Training FLOPs (forward + backward) for one packed row / set of samples.

    A plain unpacked sequence of length ``S`` is ``[S]``; a packed row is the list
    of its samples' lengths.  Model FLOPs: activation recomputation is not counted.
    ``weight_grads=False``: a frozen LLM that gradients still flow through (M2-omni PT-1's
    connectors, AT's LoRA adapters) skips its weight-gradient GEMMs, so every weight GEMM runs
    twice (forward, dgrad) while the weightless core attention still runs three times.
    """
    forward = llm_forward_flops(model, seq_lengths, tp=tp, causal=causal)
    if weight_grads:
        return FWD_BWD_FACTOR * forward
    sum_sq = sum_sq_lengths(seq_lengths)
    core = model.num_layers * attention_forward_flops(
        0, sum_sq, hidden_size=model.hidden_size, num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups, head_dim=model.head_dim, causal=causal)
    return 2 * forward + core


def llm_flops_per_step(
    model: ModelConfig, global_batch_size: int, seq_length: int, *, tp: int = 1, weight_grads: bool = True
) -> float:
    """Training FLOPs of one optimizer step over ``global_batch_size`` unpacked
    sequences of ``seq_length`` tokens (Megatron-LM's ``num_floating_point_operations``)."""
    return global_batch_size * llm_flops(model, [seq_length], tp=tp, weight_grads=weight_grads)


def flops_per_token(model: ModelConfig, seq_length: int, *, tp: int = 1) -> float:
    """Training FLOPs per token at ``seq_length`` (unpacked)."""
    return llm_flops(model, [seq_length], tp=tp) / seq_length


# ---------------------------------------------------------------- MFU


def detect_device() -> str:
    """"h100" / "h200" / "a100" / "b200" / "unknown" from the CUDA device name, "cpu" without CUDA."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return "cpu"
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    for key in ("h200", "h100", "a100", "b200"):
        if key in name:
            return key
    return "unknown"


def mfu(achieved_tflops_per_gpu: float, device: str, precision: str) -> Optional[float]:
    """Model FLOPs utilisation as a fraction (0.74 = 74 %) of the device's dense peak.

    None when the device or precision has no entry in `PEAK_TFLOPS` (CPU, unknown
    GPU, e.g. fp8 on A100).
    """
    table = PEAK_TFLOPS.get(device.lower())
    if not table:
        return None
    peak = table.get(precision.lower())
    if not peak:
        return None
    return achieved_tflops_per_gpu / peak
