"""Typed configuration of a megatron-omni run.

One YAML file fills one `RunConfig`; every section is a dataclass so that a
typo is an error, not a silently ignored key.  Field names follow megatron-core
(`TransformerConfig`, `OptimizerConfig`) wherever megatron has a name for the
same thing, so users coming from Megatron-LM recognise them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from megatron_omni.balance.config import SchedulerConfig
from megatron_omni.config.encoders import AudioConfig, VisionConfig
from megatron_omni.config.moe import MoEConfig
from megatron_omni.rl.config import GSPOConfig

# `model.packed_attention` values; `auto` resolves to `te` or `torch` (models/packed_attention.py).
PACKED_ATTENTION_CHOICES = ("auto", "te", "torch", "dense")


@dataclass
class ModelConfig:
    """A Llama-3 family decoder, built as megatron-core `GPTModel`.

    Defaults are Llama-3.1-8B's architecture (HF `config.json` names in comments).
    """

    num_layers: int = 32  # num_hidden_layers
    hidden_size: int = 4096
    ffn_hidden_size: int = 14336  # intermediate_size (SwiGLU inner width)
    num_attention_heads: int = 32
    num_query_groups: int = 8  # num_key_value_heads (GQA)
    kv_channels: Optional[int] = None  # head_dim; None = hidden_size / num_attention_heads
    vocab_size: int = 128256  # true vocabulary; padded for TP by make_vocab_size_divisible_by
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 131072
    rotary_base: float = 500000.0  # rope_theta
    # Llama-3.1 "llama3" RoPE frequency scaling (HF rope_scaling.rope_type == "llama3").
    rope_scaling: bool = True
    rope_scaling_factor: float = 8.0
    norm_epsilon: float = 1e-5  # rms_norm_eps
    tie_word_embeddings: bool = False
    init_method_std: float = 0.02  # initializer_range
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    # Which kernels build the layers: "auto" = Transformer Engine when importable, else local.
    transformer_impl: str = "auto"  # auto | transformer_engine | local
    # How packed omni rows attend within their samples (models/packed_attention.py): "te" = TE fused
    # attention on THD (cu_seqlens), "torch" = torch varlen_attn on CUDA / per-segment SDPA on CPU on
    # THD, "dense" = block-diagonal [S, S] mask (the reference), "auto" = te when TE imports, else torch.
    packed_attention: str = "auto"  # auto | te | torch | dense
    # Context parallelism of TE's attention (parallel.cp > 1 on the `te` path; megatron's
    # TransformerConfig.cp_comm_type); the `torch` path all-gathers K/V instead.
    cp_comm_type: str = "p2p"  # p2p | a2a | all_gather
    # FP8 (Transformer Engine only): None | "hybrid" (E4M3 fwd, E5M2 bwd) | "e4m3".
    fp8: Optional[str] = None
    fp8_recipe: str = "delayed"  # delayed | tensorwise (current scaling) | mxfp8 | blockwise
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    recompute_granularity: Optional[str] = None  # None | full | selective
    recompute_method: Optional[str] = None  # uniform | block (with full)
    recompute_num_layers: Optional[int] = None
    # Bitwise-reproducible steps on GPU (slower): megatron's TransformerConfig.deterministic_mode and
    # torch's deterministic algorithms; needs CUBLAS_WORKSPACE_CONFIG=:4096:8 (and with Transformer Engine
    # NVTE_ALLOW_NONDETERMINISTIC_ALGO=0) in the environment, which config/validate.py checks.
    deterministic_mode: bool = False
    # Mixture-of-experts MLPs (config/moe.py); None = dense SwiGLU MLPs.
    moe: Optional[MoEConfig] = None

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int = 1, vocab_size: Optional[int] = None) -> int:
        """Vocabulary (`vocab_size`, default `self.vocab_size`) rounded up to a multiple of
        make_vocab_size_divisible_by * tp (Megatron-LM's `_vocab_size_with_padding`): the width of
        the embedding/output layer that really runs."""
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-(vocab_size or self.vocab_size) // multiple) * multiple


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor model parallel size
    pp: int = 1  # pipeline model parallel size
    vpp: Optional[int] = None  # virtual pipeline chunks per pipeline rank (interleaved 1F1B)
    cp: int = 1  # context parallel size
    ep: int = 1  # expert model parallel size
    sequence_parallel: bool = False  # only meaningful with tp > 1
    use_distributed_optimizer: bool = True  # ZeRO-1 style sharded optimizer state over DP
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # Decoder layers on the first / last pipeline stage when the split is uneven (None = even).
    first_stage_num_layers: Optional[int] = None
    last_stage_num_layers: Optional[int] = None
    # "auto": nccl with GPUs, gloo (with CUDA emulated on CPU) without.
    backend: str = "auto"  # auto | nccl | gloo
    # CPU emulation of CUDA (parallel/cpu_emulation.py): "auto" only where no GPU can exist (no NVIDIA
    # driver or device at all; a present but failing one is an error), "on" forces it, "off" refuses it.
    cuda_emulation: str = "auto"  # auto | on | off
    distributed_timeout_minutes: int = 10


@dataclass
class OptimizerConfig:
    optimizer: str = "adam"  # AdamW-style decoupled weight decay (megatron's "adam")
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_warmup_steps: int = 0
    lr_decay_steps: Optional[int] = None  # None = train.steps
    lr_decay_style: str = "cosine"  # constant | linear | cosine | inverse-square-root | WSD
    start_weight_decay: Optional[float] = None
    end_weight_decay: Optional[float] = None
    weight_decay_incr_style: str = "constant"
    # Omni runs: a separate learning rate for the vision / audio encoders (paper Table 2 "LR of
    # Encoders", e.g. 1e-6 in PT-2 with LR 1e-5); None = the encoders use `lr`.
    encoder_lr: Optional[float] = None
    encoder_min_lr: Optional[float] = None  # None = encoder_lr * min_lr / lr
    # LR schedule after a resume whose lr/min_lr/warmup/decay differ from the checkpoint's:
    # "config" (Megatron-LM --override-opt_param-scheduler) or "checkpoint" (--use-checkpoint-...).
    resume_schedule: str = "config"
    # fp16 only (train.precision=fp16): megatron's dynamic loss scaler starts here and halves on
    # overflow (Megatron-LM --initial-loss-scale, default 2**32); loss_scale fixes it instead.
    initial_loss_scale: float = 2.0 ** 32
    loss_scale: Optional[float] = None


@dataclass
class DataSource:
    """One corpus in a blend: a megatron indexed-dataset prefix, or a JSONL/text
    file that is tokenized into one on first use (cached under data.cache_dir)."""

    path: str = ""
    weight: float = 1.0
    text_key: str = "text"  # JSON field holding the document text


@dataclass
class DataConfig:
    blend: List[DataSource] = field(default_factory=list)
    tokenizer_type: str = "sentencepiece"  # sentencepiece | huggingface | null
    tokenizer_model: Optional[str] = None  # .model file or HF tokenizer folder
    seq_length: int = 2048
    split: str = "98,2,0"  # train, valid, test percentages
    cache_dir: Optional[str] = None  # None = <train.output_dir>/data_cache
    num_workers: int = 0
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    # Omni runs: the stage's data blend (a megatron_omni.data.blend.BlendConfig YAML: manifests
    # per source, modality, weights, pure-text share, held-out validation, Table 2 media limits)
    # and the folder its manifest and media paths are relative to.
    omni_blend: Optional[str] = None
    root: Optional[str] = None
    # Random microbatches of the configured model's shapes (Megatron-LM's --mock-data); for the
    # omni model: packed rows of every configured modality with random media.
    mock: bool = False
    # Omni loader tolerance: stop with TooManyBadSamples when more than this share of the last
    # `bad_window` samples of a modality could not be used (unreadable media, too long).
    max_bad_fraction: float = 0.1
    bad_window: int = 200
    # Omni loader throughput (data/modality_stream.py::LoaderConfig; the README key table).
    lookahead: int = 256  # samples held per modality for best-fit packing (more = less padding)
    lookahead_mib: Optional[float] = 512.0  # ... and at most this much decoded media per modality (null = no cap)
    prefetch: int = 2  # microbatches built ahead per modality by a background thread (0 = on request)
    decode_workers: int = 0  # threads decoding samples ahead of the packers, shared by the modalities (0 = none)
    pin_memory: bool = True  # page-locked microbatches for async host-to-GPU copies (ignored without CUDA)


@dataclass
class TrainConfig:
    steps: int = 100
    micro_batch_size: int = 1
    global_batch_size: int = 8
    seed: int = 1234
    output_dir: str = "runs/default"
    save_interval: Optional[int] = None  # steps between checkpoints (None = only at the end)
    exit_interval: Optional[int] = None  # stop after this step, with a checkpoint
    load: Optional[str] = None  # checkpoints folder to resume from (latest one in it)
    finetune: bool = False  # load weights only: fresh optimizer, scheduler, step and data position
    # Weights to start from when `load` holds no checkpoint yet (Megatron-Bridge's
    # pretrained_checkpoint): a stage of the recipe starts from the previous stage's last
    # checkpoint, and resumes from its own `load` folder after a restart.
    pretrained_checkpoint: Optional[str] = None
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    log_interval: int = 1
    # megatron timers in every metrics row and log line (None = off): 0 step, 1 + schedule and
    # optimizer, 2 + per-microbatch compute / p2p / data wait (syncs the GPU: for profiling).
    timing_log_level: Optional[int] = None
    eval_interval: Optional[int] = None
    eval_iters: int = 2
    tensorboard: bool = True
    # Distributed-optimizer state layout in checkpoints: "fully_reshardable" loads at any
    # TP/PP/DP (gathers over DP at save); "dp_reshardable" is faster but reshards over DP only.
    ckpt_optimizer_sharding: str = "fully_reshardable"
    keep_last_checkpoints: Optional[int] = None  # None = keep all
    # Start a fresh run (train.load empty or holding no checkpoint) although output_dir/checkpoints
    # already holds checkpoints of another run, which it would overwrite (a typo in train.load).
    allow_overwrite: bool = False
    # Divergence guard (training/guards.py): a step with a NaN/Inf loss or gradient is skipped;
    # after this many consecutive ones the run saves the last finite weights and stops (0 = off:
    # megatron's DDP check raises at the first NaN gradient).
    skip_nonfinite_steps: int = 3
    # Loss-spike log (training/loss_spikes.py): a step whose loss exceeds this factor x the median
    # of the last `loss_spike_window` steps is logged with every microbatch's sample ids, per DP
    # rank, in output_dir/loss_spikes.jsonl (None = off).
    loss_spike_factor: Optional[float] = None
    loss_spike_window: int = 20


@dataclass
class LoRAConfig:
    """LoRA adapters on the LLM's linear layers (paper Sec. 2.2 alignment tuning: "LoRA to update
    5.0% of the LLM's backbone weights"); tensor-parallel like their base layers (models/lora.py)."""

    rank: Optional[int] = None  # None = the rank that trains `fraction` of the backbone weights
    fraction: float = 0.05  # Sec. 2.2
    alpha: Optional[float] = None  # None = rank (scale 1)
    dropout: float = 0.0
    targets: List[str] = field(default_factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])


@dataclass
class DPOConfig:
    """The alignment-tuning loss of M2-omni (Sec. 2.2, Eq. 2): L_dpo + lambda * L_it (training/dpo.py)."""

    beta: float = 0.1  # DPO temperature; not in the M2-omni paper (Rafailov et al. use 0.1-0.5)
    it_weight: float = 0.3  # lambda of Eq. 2 ("we empirically set lambda to 0.3")
    lora_fraction: float = 0.05  # "LoRA to update 5.0% of the LLM's backbone weights" (Sec. 2.2)


# Modules that can be frozen one by one (paper Table 2 "trainable modules" per stage).
OMNI_MODULES = ("vision_encoder", "vision_connector", "audio_encoder", "audio_connector", "llm")


@dataclass
class OmniConfig:
    """The omni model around the `model` (LLM) section: encoders, connectors, vocabulary, M-RoPE.

    The LLM's embedding/output vocabulary is `OmniVocab(model.vocab_size, audio_codebook_size)`:
    the text tokenizer's `model.vocab_size` ids + the omni special tokens + the audio codes.
    """

    vision: Optional[VisionConfig] = None  # NaViT + 2x2 merge MLP (Sec. 2.1); null = no vision
    audio: Optional[AudioConfig] = None  # SAN-M / Whisper-style encoder + connector; null = no audio
    # Discrete speech output tokens (Sec. 2.1 "Audio Decoder": CosyVoice speech tokens, 4096 codes).
    audio_codebook_size: int = 4096
    # M-RoPE (t, h, w) channel split of head_dim / 2 rotary frequencies (Qwen2-VL: [16, 24, 24]
    # for head_dim 128); must sum to head_dim / 2.
    mrope_section: List[int] = field(default_factory=lambda: [16, 24, 24])
    freeze: List[str] = field(default_factory=list)  # subset of OMNI_MODULES

    def __post_init__(self):
        unknown = [m for m in self.freeze if m not in OMNI_MODULES]
        if unknown:
            raise ValueError(f"omni.freeze: unknown module(s) {unknown}; choose from {list(OMNI_MODULES)}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    omni: Optional[OmniConfig] = None  # null = a text-only Llama run
    lora: Optional[LoRAConfig] = None  # adapters on the LLM (alignment tuning); null = full weights
    dpo: Optional[DPOConfig] = None  # beta and lambda of Eq. 2 when the blend has preference pairs
    # The GSPO reinforcement-learning stage (Uni-MoE 2.0: GSPO, then DPO; megatron_omni/rl/); None = no RL.
    gspo: Optional[GSPOConfig] = None
    # Modality scheduling and loss balance of omni stages (M2-omni Sec. 3); None = text-only run.
    balance: Optional[SchedulerConfig] = None
