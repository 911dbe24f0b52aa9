"""Per-GPU memory of one layout: model states, FP8 weight copies, activations.

Model states (per parameter held by the GPU, after TP/PP sharding), from the Megatron
Core distributed-optimizer docs ("Distributed Optimizer", theoretical bytes per
parameter with d = data-parallel size): bf16 params + fp32 grads = 6 + 12/d, bf16 params
+ bf16 grads = 4 + 16/d.  That is bf16 weights (2), the gradient buffer (4 or 2), and the
fp32 master weights (4) + Adam m and v (8) [+ an fp32 main-grad shard (4) when the
buffer is bf16] sharded over the data-parallel group.  megatron-core shards over
dp*cp (context-parallel ranks hold the same weights and reduce gradients together), so
d = dp*cp here.  megatron-omni's DDP uses grad_reduce_in_fp32=True (training/setup.py).

Activations follow the per-layer accounting of Korthikanti et al., "Reducing
Activation Recomputation in Large Transformer Models" (2022): a GPT layer stores
``s*b*h*(34 + 5*a*s/h)`` bytes; tensor + sequence parallelism divide all of it by t;
selective recomputation (of core attention) removes the ``5*a*s^2*b`` term (2 bytes of softmax
output a score there; 6 when softmax falls back to fp32 in torch, rows over the fused kernel's
4096 keys), and flash attention never materialises it in the first place (packed omni rows: the THD paths of
`model.packed_attention`; its `dense` block-diagonal mask path stores the s^2 scores again).  The 34 is for GPT (4h GeLU
MLP, LayerNorm, dropout); the same bookkeeping for a Llama layer (RMSNorm, GQA, SwiGLU
with ffn_hidden_size f, no dropout, flash attention), in bytes per token:

    attention:  norm input 2h + QKV GEMM input 2h + Q 2h + K,V 4*g*d + output O 2h
    MLP:        norm input 2h + fc1 GEMM input 2h + SwiGLU input 4f + fc2 GEMM input 2f

i.e. 12h + 4gd + 6f (33.5h for Llama-3-70B, close to the paper's 34h).  With FP8
(Transformer Engine) each GEMM keeps its FP8-cast input for the weight-gradient GEMM,
1 byte instead of 2 (plus an FP8 copy of O next to the bf16 O that flash attention
keeps).  Full recomputation keeps only each layer's 2h input, plus one layer's working
set while it is recomputed.

Pipeline: the first rank holds the most microbatches in flight.  Megatron's 1F1B runs
pp - r - 1 warmup forwards on rank r (so rank 0 keeps pp microbatches of its L/pp
layers, i.e. L layers' worth); the interleaved schedule runs 2(pp - r - 1) + (v - 1)pp
warmup chunk-forwards, which for rank 0 is the (1 + (pp-1)/(pp*v)) factor of Megatron-LM's
`theoretical_memory_usage.py`.  The last rank holds the output layer and the logits
(bf16 logits + the fp32 softmax the vocab-parallel cross entropy keeps) for one
microbatch.  Both ranks are computed; the larger one is the layout's memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from megatron_omni.config.schema import ModelConfig
from megatron_omni.planner.cluster import GIB
from megatron_omni.planner.layout import Job, Layout
from megatron_omni.planner.omni import ENCODER_MODULES, encoder_params
from megatron_omni.training import flops as F


@dataclass(frozen=True)
class MemoryAssumptions:
    flash_attention: bool = True  # TE fused/flash attention: no s^2 tensors are stored
    # Longest key length whose s^2 scores a fused softmax kernel handles, keeping only the bf16
    # probabilities (2 bytes a score): megatron-core 0.16.1 `FusedScaleMaskSoftmax.is_kernel_available`,
    # 16 < sk <= 4096.  Longer rows (and CPU runs: 0) take its torch fallback, softmax in fp32: the
    # fp32 output kept for the softmax backward + its bf16 copy kept by the probs x V GEMM, 6 bytes.
    fused_softmax_max_seq: int = 4096
    grad_fp32: bool = True  # fp32 gradient buffer (megatron-omni: grad_reduce_in_fp32=True)
    distributed_optimizer: bool = True
    # TE keeps an FP8 copy of every GEMM weight and of its transpose across microbatches
    # (Hopper FP8 GEMMs take only the TN layout), 1 byte each.
    fp8_weight_cache_bytes: float = 2.0
    # CUDA context, cuBLAS/TE workspaces, NCCL and userbuffer communication buffers.
    overhead_gib: float = 2.0


@dataclass(frozen=True)
class ParamCounts:
    """Full (unsharded) parameter counts of a Llama decoder at a given TP (vocab padding)."""

    layer_sharded: int  # per layer: QKV, output projection, fc1 (gate+up), fc2 -- split over TP
    layer_replicated: int  # per layer: the two RMSNorm weights -- replicated on every TP rank
    embedding: int  # padded_vocab x hidden
    output: int  # padded_vocab x hidden when untied, else 0
    final_norm: int
    num_layers: int
    # MoE: per layer, the routed experts' weights -- split over EP x TP (expert TP = TP).
    layer_experts: int = 0

    @property
    def total(self) -> int:
        return (self.num_layers * (self.layer_sharded + self.layer_replicated + self.layer_experts)
                + self.embedding + self.output + self.final_norm)


def param_counts(model: ModelConfig, tp: int = 1) -> ParamCounts:
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.head_dim
    q, kv = model.num_attention_heads * d, model.num_query_groups * d
    vocab = model.padded_vocab_size(tp)
    mlp, experts, router = h * 2 * f + f * h, 0, 0
    if model.moe is not None:  # shared expert (TP-split), routed experts (EP x TP), router (replicated)
        moe = model.moe
        mlp = 3 * h * (moe.shared_expert_ffn_hidden_size or 0) + (h if moe.shared_expert_gate else 0)
        experts = moe.num_experts * 3 * h * moe.ffn_hidden_size
        router = moe.num_router_outputs * h
    return ParamCounts(
        layer_sharded=h * (q + 2 * kv) + q * h + mlp,
        layer_replicated=2 * h + router,
        layer_experts=experts,
        embedding=vocab * h,
        output=0 if model.tie_word_embeddings else vocab * h,
        final_norm=h,
        num_layers=model.num_layers,
    )


def stage_params_per_gpu(model: ModelConfig, layout: Layout, rank: int) -> Dict[str, int]:
    """Parameters held by one GPU of pipeline rank `rank`: {'linear': TP-sharded GEMM
    weights, 'other': norms + embedding/output shards}."""
    pc = param_counts(model, layout.tp)
    layers = layout.stage_layers(model.num_layers, rank)
    first, last = rank == 0, rank == layout.pp - 1
    linear = layers * pc.layer_sharded // layout.tp + layers * pc.layer_experts // (layout.tp * layout.ep)
    other = layers * pc.layer_replicated
    if first:
        other += pc.embedding // layout.tp
    if last:
        other += pc.final_norm
        # Tied embeddings still need the output weight on the last stage when pp > 1
        # (megatron keeps a copy there and all-reduces its gradient with the first stage).
        if pc.output or (layout.pp > 1 and model.tie_word_embeddings):
            other += pc.embedding // layout.tp
    return {"linear": linear, "other": other}


def trainable_params_per_gpu(job: Job, layout: Layout, rank: int) -> Dict[str, int]:
    """{'trainable', 'frozen'} parameters one GPU of rank `rank` holds: the LLM's (or its LoRA
    adapters' when the LLM is frozen), and on rank 0 the encoders and connectors."""
    llm = sum(stage_params_per_gpu(job.model, layout, rank).values())
    w = job.omni
    if w is None:
        return {"trainable": llm, "frozen": 0}
    out = {"trainable": 0, "frozen": 0}
    if w.trainable("llm"):
        out["trainable"] += llm
    else:
        out["frozen"] += llm
        # Adapters are TP-sharded like their base layers: about `fraction` of this GPU's share.
        out["trainable"] += int((w.lora_fraction or 0.0) * llm)
    if rank == 0:
        for module, counts in encoder_params(w.omni).items():
            out["trainable" if w.trainable(module) else "frozen"] += counts.per_gpu(layout.tp)
    return out


def model_state_bytes_per_param(dp_shards: int, a: MemoryAssumptions) -> Dict[str, float]:
    """Bytes per locally held parameter: weights, gradient buffer, optimizer (sharded over dp_shards)."""
    grad = 4.0 if a.grad_fp32 else 2.0
    opt = 12.0 + (0.0 if a.grad_fp32 else 4.0)  # fp32 master + Adam m, v (+ fp32 main-grad shard)
    if a.distributed_optimizer:
        opt /= dp_shards
    return {"weights": 2.0, "grads": grad, "optimizer": opt}


def stores_attention_scores(job: Job, a: MemoryAssumptions) -> bool:
    """Core attention keeps its s x s scores for backward: without flash attention, or for packed
    omni rows on the dense block-diagonal mask path (`model.packed_attention=dense`: TE runs an
    arbitrary mask unfused, megatron's local attention always materialises the scores).  The THD
    paths (`te`, `torch`, `auto`) run flash / varlen kernels on cu_seqlens and store none."""
    return not a.flash_attention or (job.omni is not None and job.model.packed_attention == "dense")


def layer_activation_bytes_per_token(model: ModelConfig, job: Job, layout: Layout, a: MemoryAssumptions) -> float:
    """Bytes one decoder layer keeps per (local) token for its backward, before TP/SP division."""
    h, d = model.hidden_size, model.head_dim
    f = F.mlp_hidden_per_token(model)  # MoE: the experts a token runs keep their activations
    q, kv = model.num_attention_heads * d, model.num_query_groups * d
    gemm_in = 1.0 if job.fp8 else 2.0
    attention = 2 * h + gemm_in * h + 2 * q + 2 * 2 * kv + 2 * q + (q if job.fp8 else 0)
    mlp = 2 * h + gemm_in * h + 2 * 2 * f + gemm_in * f
    dropout_masks = 2 * h if model.hidden_dropout > 0 else 0  # 1-byte masks after attention and MLP
    core = 0.0
    if stores_attention_scores(job, a) and layout.recompute == "none":
        # softmax output (2 bytes; 6 from the fp32 fallback, `MemoryAssumptions.fused_softmax_max_seq`),
        # + dropout mask and output (3 bytes) with attention dropout: the paper's 5*a*s^2*b, per
        # token: heads * s_kv * bytes (the dense mask scores the whole row, whatever its samples)
        per_score = (2 if job.seq_len <= a.fused_softmax_max_seq else 6) + (3 if model.attention_dropout > 0 else 0)
        core = model.num_attention_heads * job.seq_len * per_score
    return attention + mlp + dropout_masks + core


def in_flight_microbatches(layout: Layout, num_microbatches: int, rank: int) -> float:
    """Microbatches whose first-chunk activations rank `rank` holds at the peak of its schedule."""
    pp, m = layout.pp, num_microbatches
    if pp == 1:
        return 1.0
    if layout.vpp is None:
        return float(min(m, pp - rank))
    # Interleaved: chunk 0 of microbatches 0..pp-1 runs first, chunk 0 of the next pp comes
    # around after the other chunks, before the first backward reaches chunk 0.
    return float(min(m, 2 * (pp - rank) - 1))


def in_flight_layers(model: ModelConfig, layout: Layout, num_microbatches: int, rank: int) -> float:
    """Layers' worth of one microbatch's activations rank `rank` holds at the peak of its schedule."""
    pp, v, m = layout.pp, layout.v, num_microbatches
    layers = layout.stage_layers(model.num_layers, rank)
    if pp == 1:
        return float(model.num_layers)  # forward then backward of each microbatch
    if layout.vpp is None:
        return min(m, pp - rank) * layers
    total_chunks = m * v
    warmup = total_chunks if m == pp else (pp - rank - 1) * 2 + (v - 1) * pp
    return min(total_chunks, warmup + 1) * (layers / v)


def encoder_activation_bytes(job: Job, layout: Layout, num_microbatches: int) -> float:
    """Encoder + connector activations rank 0 keeps: its in-flight microbatches, each taken as
    the heaviest modality of the stage (consecutive microbatches of a step share a modality in
    the accumulation plan)."""
    w = job.omni
    if w is None:
        return 0.0
    kept = [m for m in ENCODER_MODULES if w.keeps_activations(m)]
    per_row = max((sum(w.row_media(mod, job.seq_len, layout.micro_batch, layout.cp).activation_bytes(m, layout.tp)
                       for m in kept) for mod in w.modalities), default=0.0)
    return in_flight_microbatches(layout, num_microbatches, 0) * per_row


@dataclass(frozen=True)
class MemoryBreakdown:
    rank: str  # "first" | "last" pipeline rank (the larger one is reported)
    params: int  # parameters held by this GPU
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    fp8_gib: float
    activations_gib: float  # decoder layers and output layer
    overhead_gib: float
    encoder_activations_gib: float = 0.0  # omni, rank 0: encoders and connectors

    @property
    def total_gib(self) -> float:
        return (self.weights_gib + self.grads_gib + self.optimizer_gib + self.fp8_gib
                + self.activations_gib + self.encoder_activations_gib + self.overhead_gib)

    def as_dict(self) -> Dict[str, float]:
        return {
            "rank": self.rank, "params": self.params,
            "weights_gib": round(self.weights_gib, 3), "grads_gib": round(self.grads_gib, 3),
            "optimizer_gib": round(self.optimizer_gib, 3), "fp8_gib": round(self.fp8_gib, 3),
            "activations_gib": round(self.activations_gib, 3),
            "encoder_activations_gib": round(self.encoder_activations_gib, 3),
            "overhead_gib": round(self.overhead_gib, 3),
            "total_gib": round(self.total_gib, 3),
        }


def _rank_memory(job: Job, layout: Layout, num_gpus: int, rank: int, a: MemoryAssumptions) -> MemoryBreakdown:
    model = job.model
    linear = stage_params_per_gpu(model, layout, rank)["linear"]
    params = trainable_params_per_gpu(job, layout, rank)
    per_param = model_state_bytes_per_param(layout.dp(num_gpus) * layout.cp, a)
    fp8 = linear * a.fp8_weight_cache_bytes if job.fp8 else 0.0
    n, trainable = params["trainable"] + params["frozen"], params["trainable"]  # frozen: bf16 weights only

    tokens = layout.micro_batch * job.seq_len / layout.cp  # local tokens of one microbatch
    sp = layout.tp  # sequence parallel (on whenever tp > 1) divides every stored tensor by t
    num_microbatches = layout.num_microbatches(num_gpus, job.global_batch)
    layers = in_flight_layers(model, layout, num_microbatches, rank)
    full_layer = layer_activation_bytes_per_token(model, job, layout, a) * tokens / sp
    if layout.recompute == "full":
        act = layers * (2 * model.hidden_size) * tokens / sp + full_layer  # checkpoints + one live layer
    else:
        act = layers * full_layer
    if rank == layout.pp - 1:
        vocab = model.padded_vocab_size(layout.tp)
        # final-norm input + output-layer input (2 bytes each), bf16 logits + fp32 softmax (6 bytes)
        act += tokens * (4 * model.hidden_size + 6 * vocab) / layout.tp
    if job.omni is not None and not job.omni.keeps_activations("llm"):
        act = 0.0  # nothing trains: forward only
    encoders = encoder_activation_bytes(job, layout, num_microbatches) if rank == 0 else 0.0
    return MemoryBreakdown(
        rank="first" if rank == 0 else "last",
        params=n,
        weights_gib=n * per_param["weights"] / GIB,
        grads_gib=trainable * per_param["grads"] / GIB,
        optimizer_gib=trainable * per_param["optimizer"] / GIB,
        fp8_gib=fp8 / GIB,
        activations_gib=act / GIB,
        overhead_gib=a.overhead_gib,
        encoder_activations_gib=encoders / GIB,
    )


def estimate_memory(job: Job, layout: Layout, num_gpus: int, a: MemoryAssumptions = MemoryAssumptions()) -> MemoryBreakdown:
    """Memory of the fuller of the first and last pipeline ranks (middle ranks hold less)."""
    first = _rank_memory(job, layout, num_gpus, 0, a)
    if layout.pp == 1:
        return first
    last = _rank_memory(job, layout, num_gpus, layout.pp - 1, a)
    return max(first, last, key=lambda m: m.total_gib)
