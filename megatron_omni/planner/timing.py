"""Step time of one layout: compute at a stated efficiency, exposed communication, bubble.

Compute.  The FLOPs are Megatron-LM's model FLOPs (`training/flops.py`: causal attention
halved, GQA, SwiGLU, padded vocab), plus the recomputed forward when activations are
recomputed.  Core attention of a packed omni row is sum L_i^2 over its samples
(`row_segment_mix`), what the THD kernels run; a text LLM row is one sequence, S^2.  They run at ``efficiency x dense peak``; the efficiencies are the planner's
only fitted constants (see `anchors.py`, which prints the fit).  With FP8 only the decoder
GEMMs run at the FP8 rate; core attention and the output layer stay at the bf16 rate.  The
memory-bound ops outside the FLOP count (norms, residual adds, RoPE, SwiGLU) stream their
bytes at 80 % of HBM bandwidth.  The pipeline runs at the pace of its slowest rank: the
last one, which also computes the output layer.

Communication (per microbatch unless noted; bandwidths from `cluster.py`):

* TP with sequence parallelism: per layer an all-gather and a reduce-scatter of the
  ``s/cp * b * h`` bf16 activations around attention and around the MLP, in forward and
  again in backward -- 4 all-reduce-equivalents per layer (+2 with full recompute),
  each ``2(t-1)/t * bytes / bw``.  NVLink while tp <= GPUs per node.
* CP (ring attention): per layer ``cp-1`` K/V chunk exchanges forward and ``2(cp-1)``
  (K/V and their gradients) backward, each ``s/cp * b * 2*g*d * 2 / t`` bytes.
* PP: each rank sends one activation forward and one gradient backward per model chunk,
  ``s/cp * b * h * 2 / t`` bytes each (megatron scatters p2p tensors over TP with SP).
* Bubble: ``(p-1)/v`` extra microbatch slots: step = (m + (p-1)/v) x slowest microbatch.
* DP (per step): reduce-scatter of the gradient buffer and all-gather of the bf16 weights
  over the dp*cp group (distributed optimizer), overlapped with the last microbatch's
  backward and the first microbatch's forward (overlap_grad_reduce/overlap_param_gather);
  what does not fit in those windows is exposed.
* Optimizer step: Adam over the local shard, HBM-bandwidth bound.

Rank order is megatron's default tp-cp-ep-dp-pp, so a group of size n with stride k spans
n*k consecutive ranks, which decides NVLink vs InfiniBand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

from megatron_omni.planner.cluster import Cluster
from megatron_omni.planner.layout import Job, Layout
from megatron_omni.planner.memory import MemoryAssumptions, model_state_bytes_per_param, trainable_params_per_gpu
from megatron_omni.planner.omni import encoder_params
from megatron_omni.training import flops as F


HBM_EFFICIENCY = 0.8  # achieved / datasheet HBM bandwidth of streaming kernels


@dataclass(frozen=True)
class Efficiency:
    """Achieved fraction of the dense tensor-core peak for the model's FLOPs.

    `bf16` applies to everything in a BF16 run and, in an FP8 run, to what stays in bf16
    (core attention, output layer); `fp8` applies to the decoder GEMMs TE runs in FP8.
    Fitted on the two calibration anchors in `anchors.py` (`fitted_efficiency` solves them
    exactly: bf16 0.615, fp8 0.503 given bf16 0.62), rounded to two digits: 0.62 of the
    989 TFLOP/s BF16 peak reproduces the 54 % MFU Llama-3.1-70B BF16 run, 0.50 of the
    1979 TFLOP/s FP8 peak reproduces Megatron-Bridge's 1633 tokens/s/GPU Llama-3-70B FP8
    run.  The FP8 fraction is lower because FP8 GEMMs are more often limited by memory
    traffic (casts, amax reductions, transposes) than by the tensor cores.
    """

    bf16: float = 0.62
    fp8: float = 0.50

    def of(self, precision: str) -> float:
        return getattr(self, precision)


@dataclass(frozen=True)
class Overlap:
    """Fraction of each communication's time left on the critical path (1 = fully exposed)."""

    # TE userbuffer TP overlap (tp_comm_overlap, as in the Megatron-Bridge recipes) hides most
    # of it; without it megatron still overlaps the backward all-gather/reduce-scatter with the
    # dgrad/wgrad GEMMs but not the forward ones (--no-tp-overlap: 0.5).
    tp: float = 0.2
    cp: float = 0.3  # TE ring attention overlaps the next K/V exchange with the current chunk
    pp_interleaved: float = 0.2  # overlap_p2p_comm (interleaved schedule)
    pp_plain: float = 1.0  # 1F1B without interleaving: blocking send/recv
    dp_min: float = 0.05  # first param-gather / last grad-reduce bucket never overlap


@dataclass(frozen=True)
class TimeBreakdown:
    num_microbatches: int
    compute_s: float  # slowest rank, all microbatches, incl. recompute
    tp_s: float
    cp_s: float
    pp_s: float
    bubble_s: float
    dp_s: float
    optimizer_s: float

    @property
    def step_s(self) -> float:
        return self.compute_s + self.tp_s + self.cp_s + self.pp_s + self.bubble_s + self.dp_s + self.optimizer_s

    def as_dict(self) -> Dict[str, float]:
        out = {k: round(getattr(self, k), 5) for k in
               ("compute_s", "tp_s", "cp_s", "pp_s", "bubble_s", "dp_s", "optimizer_s")}
        out["step_s"] = round(self.step_s, 5)
        out["num_microbatches"] = self.num_microbatches
        return out


def _attention_core_forward_flops(job: Job, sum_sq: int) -> float:
    """QK^T and softmax.V of one layer (no token-linear terms: num_tokens=0)."""
    m = job.model
    return F.attention_forward_flops(
        0, sum_sq, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups, head_dim=m.head_dim,
    )


def _layer_gemm_forward_flops(job: Job, tokens: int) -> float:
    """QKV, output projection and the SwiGLU MLP of one layer (the GEMMs TE runs in FP8)."""
    m = job.model
    return F.attention_forward_flops(
        tokens, 0, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups, head_dim=m.head_dim,
    ) + F.decoder_mlp_forward_flops(m, tokens)


def row_segment_mix(job: Job, num_microbatches: int) -> List[Tuple[float, List[int]]]:
    """(share of the step's microbatches, sample lengths of one row): a text LLM row is one unpacked
    sequence (Megatron-LM's formula), an omni row the packed samples `OmniWorkload.row_segments`
    models per modality, mixed as the modality scheduler mixes the microbatches."""
    if job.omni is None:
        return [(1.0, [job.seq_len])]
    return job.omni.row_segment_mix(job.seq_len, num_microbatches)


def mean_row_sum_sq(job: Job, num_microbatches: int) -> float:
    """sum L_i^2 of an average row of the step (`flops.sum_sq_lengths`)."""
    return sum(share * F.sum_sq_lengths(segments) for share, segments in row_segment_mix(job, num_microbatches))


def rank_flops_per_microbatch(job: Job, layout: Layout, rank: int, num_microbatches: int) -> Tuple[float, float]:
    """FLOPs one GPU of pipeline rank `rank` executes per microbatch in its decoder layers (and
    output layer on the last rank), incl. recompute, split into (decoder GEMMs, everything
    else).  With FP8 only the decoder GEMMs run on the FP8 tensor cores; core attention and the
    output layer stay in bf16 (megatron's output layer is not a TE module; FP8 attention is off
    by default).  A frozen omni LLM runs 2 passes (no weight gradients), see `planner/omni.py`."""
    m, s, b = job.model, job.seq_len, layout.micro_batch
    tokens, sum_sq = b * s, b * mean_row_sum_sq(job, num_microbatches)
    layers = layout.stage_layers(m.num_layers, rank)
    passes = F.FWD_BWD_FACTOR if job.omni is None else job.omni.passes("llm")
    gemm_fwd = _layer_gemm_forward_flops(job, tokens)
    core_fwd = _attention_core_forward_flops(job, sum_sq)
    # Core attention has no weights: any backward through it is its full 2 x forward.
    gemm = layers * passes * gemm_fwd
    other = layers * (1 if passes == 1 else F.FWD_BWD_FACTOR) * core_fwd
    if layout.recompute == "full":
        gemm += layers * gemm_fwd
        other += layers * core_fwd
    elif layout.recompute == "selective":  # core attention forward only (QK^T, softmax.V)
        other += layers * core_fwd
    if rank == layout.pp - 1:
        other += passes * F.logits_forward_flops(
            tokens, hidden_size=m.hidden_size, padded_vocab=m.padded_vocab_size(layout.tp))
    shard = layout.tp * layout.cp
    return gemm / shard, other / shard


def encoder_seconds_per_microbatch(job: Job, layout: Layout, rate: float, num_microbatches: int) -> float:
    """Rank 0's encoder + connector time per microbatch, averaged over the modality mix of the
    step (the scheduler's shares), at the bf16 `rate`.  TP-split modules divide over TP; the
    SAN-M encoder is replicated, so every TP rank runs all of it."""
    w = job.omni
    if w is None:
        return 0.0
    counts = encoder_params(w.omni)
    seconds = 0.0
    for modality, share in w.modality_shares(num_microbatches).items():
        row = w.row_media(modality, job.seq_len, layout.micro_batch, layout.cp)
        for module, fwd in row.forward_flops.items():
            c = counts[module]
            split = layout.tp if c.tp_split >= c.replicated else 1
            seconds += share * w.passes(module) * fwd / split / rate
    return seconds


def elementwise_bytes_per_token_layer(job: Job) -> float:
    """HBM traffic of one layer's memory-bound ops per token, forward + backward.

    Forward: two RMSNorms (read 2h, write 2h each), two residual adds (read 4h, write 2h
    each), RoPE on Q and K (read + write), SwiGLU (read 4f, write 2f); backward moves about
    twice that.  These ops are not in the FLOP count but take time that grows with h, not
    h^2 -- the reason small models reach a lower fraction of peak.
    """
    m = job.model
    h, f = m.hidden_size, F.mlp_hidden_per_token(m)  # MoE: the experts a token runs
    q, kv = m.num_attention_heads * m.head_dim, m.num_query_groups * m.head_dim
    forward = 2 * 4 * h + 2 * 6 * h + 2 * 2 * (q + kv) + 6 * f
    return 3.0 * forward


def _ring(n: int, nbytes: float, bw_gb_s: float) -> float:
    """Seconds for a ring all-gather or reduce-scatter of `nbytes` (full size) over n ranks."""
    return 0.0 if n <= 1 else (n - 1) / n * nbytes / (bw_gb_s * 1e9)


def estimate_step(
    job: Job,
    layout: Layout,
    cluster: Cluster,
    eff: Efficiency = Efficiency(),
    overlap: Overlap = Overlap(),
    mem: MemoryAssumptions = MemoryAssumptions(),
) -> TimeBreakdown:
    m = job.model
    n = cluster.num_gpus
    tp, pp, cp, v = layout.tp, layout.pp, layout.cp, layout.v
    dp = layout.dp(n)
    micro = layout.num_microbatches(n, job.global_batch)
    gemm_rate = cluster.gpu.peak_tflops(job.precision) * 1e12 * eff.of(job.precision)
    bf16_rate = cluster.gpu.peak_tflops("bf16") * 1e12 * eff.bf16

    # Compute per microbatch of the first rank (encoders) and of the last (output layer); the
    # pipeline runs at the pace of the slower.
    hbm_rate = cluster.gpu.hbm_tb_s * 1e12 * HBM_EFFICIENCY
    tokens = layout.micro_batch * job.seq_len / cp
    elementwise_per_layer = tokens / tp * elementwise_bytes_per_token_layer(job)
    if layout.recompute == "full":
        elementwise_per_layer *= 4 / 3  # the forward third runs twice

    def rank_seconds(rank: int) -> float:
        gemm_flops, other_flops = rank_flops_per_microbatch(job, layout, rank, micro)
        t = (gemm_flops / gemm_rate + other_flops / bf16_rate
             + layout.stage_layers(m.num_layers, rank) * elementwise_per_layer / hbm_rate)
        return t + (encoder_seconds_per_microbatch(job, layout, bf16_rate, micro) if rank == 0 else 0.0)

    t_comp = max(rank_seconds(r) for r in {0, pp - 1})
    layers = max(layout.stage_layers(m.num_layers, r) for r in {0, pp - 1})
    act_bytes = tokens * m.hidden_size * 2  # bf16 activations of one microbatch on one CP rank

    # TP: AG + RS around attention and MLP, forward and backward (+ recomputed forward).
    ar_per_layer = 4 + (2 if layout.recompute == "full" else 0)
    bw_tp = cluster.bandwidth_gb_s(tp)
    t_tp = (layers * ar_per_layer + 1) * 2 * _ring(tp, act_bytes, bw_tp) * overlap.tp  # +1: output layer AG/RS

    # CP: ring exchange of K/V chunks (GQA: 2*g*d wide), per TP rank.
    t_cp = 0.0
    if cp > 1:
        kv_bytes = tokens * 2 * m.num_query_groups * m.head_dim * 2 / tp
        exchanges = 3 * (cp - 1) + ((cp - 1) if layout.recompute == "full" else 0)
        t_cp = layers * exchanges * kv_bytes / (cluster.bandwidth_gb_s(tp * cp) * 1e9) * overlap.cp

    # PP: one send forward and one backward per model chunk; stages are tp*cp*dp ranks apart.
    t_pp = 0.0
    if pp > 1:
        p2p_bytes = act_bytes / tp
        bw_pp = cluster.bandwidth_gb_s(tp * cp * dp * pp)
        exposed = overlap.pp_interleaved if layout.vpp else overlap.pp_plain
        t_pp = 2 * v * p2p_bytes / (bw_pp * 1e9) * exposed

    t_micro = t_comp + t_tp + t_cp + t_pp
    bubble = (pp - 1) / v * t_micro

    # DP: distributed optimizer reduce-scatters grads, all-gathers bf16 params, over dp*cp.
    shards = dp * cp
    # Only trainable parameters have gradients to reduce and updated weights to gather.
    params = max(trainable_params_per_gpu(job, layout, r)["trainable"] for r in {0, pp - 1})
    per_param = model_state_bytes_per_param(shards, mem)
    bw_dp = cluster.bandwidth_gb_s(tp * cp * dp)
    t_rs = _ring(shards, params * per_param["grads"], bw_dp)
    t_ag = _ring(shards, params * 2.0, bw_dp)
    t_dp = 0.0
    if shards > 1:
        t_dp = (max(overlap.dp_min * t_rs, t_rs - 2 / 3 * t_comp)
                + max(overlap.dp_min * t_ag, t_ag - 1 / 3 * t_comp))

    # Adam on the local shard: read/write fp32 master, m, v (24 B), read fp32 grad (4 B),
    # write bf16 param (2 B), grad-norm read (4 B) at ~80 % of HBM bandwidth.
    t_opt = params / shards * 34 / hbm_rate

    return TimeBreakdown(
        num_microbatches=micro,
        compute_s=micro * t_comp,
        tp_s=micro * t_tp,
        cp_s=micro * t_cp,
        pp_s=micro * t_pp,
        bubble_s=bubble,
        dp_s=t_dp,
        optimizer_s=t_opt,
    )
