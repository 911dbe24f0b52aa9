"""Cross-field checks that megatron would otherwise report deep inside a stack trace."""

from __future__ import annotations

from megatron_omni.config.schema import PACKED_ATTENTION_CHOICES, RunConfig
from megatron_omni.config.typed import ConfigError

_CHOICES = {
    "model.transformer_impl": ("auto", "transformer_engine", "local"),
    "model.packed_attention": PACKED_ATTENTION_CHOICES,
    "model.cp_comm_type": ("p2p", "a2a", "all_gather"),
    "model.fp8": (None, "hybrid", "e4m3"),
    "model.fp8_recipe": ("delayed", "tensorwise", "mxfp8", "blockwise"),
    "model.recompute_granularity": (None, "full", "selective"),
    "parallel.backend": ("auto", "nccl", "gloo"),
    "parallel.cuda_emulation": ("auto", "on", "off"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
    "optimizer.optimizer": ("adam", "sgd"),
    "optimizer.lr_decay_style": ("constant", "linear", "cosine", "inverse-square-root", "WSD"),
    "train.ckpt_optimizer_sharding": ("fully_reshardable", "dp_reshardable"),
    "data.tokenizer_type": ("sentencepiece", "huggingface", "null"),
    "optimizer.resume_schedule": ("config", "checkpoint"),
}


def _get(cfg: RunConfig, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def data_parallel_size(cfg: RunConfig, world_size: int) -> int:
    p = cfg.parallel
    return world_size // (p.tp * p.pp * p.cp)


def validate(cfg: RunConfig, world_size: int) -> None:
    """Raise ConfigError (one line, naming the fix) on the first inconsistency."""
    for dotted, choices in _CHOICES.items():
        if _get(cfg, dotted) not in choices:
            raise ConfigError(f"{dotted}={_get(cfg, dotted)!r} is not one of {list(choices)}")

    m, p, t = cfg.model, cfg.parallel, cfg.train
    for name in ("tp", "pp", "cp", "ep"):
        if getattr(p, name) < 1:
            raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(p, name)}")
    if m.num_attention_heads % p.tp:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tp={p.tp}"
        )
    if m.num_query_groups % p.tp:
        raise ConfigError(f"model.num_query_groups={m.num_query_groups} is not divisible by parallel.tp={p.tp}")
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} is not a multiple of "
            f"model.num_query_groups={m.num_query_groups}"
        )
    if m.ffn_hidden_size % p.tp:
        raise ConfigError(f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by parallel.tp={p.tp}")

    # Layers per pipeline stage (uneven first/last stage allowed, megatron-style).
    middle_layers = m.num_layers - (p.first_stage_num_layers or 0) - (p.last_stage_num_layers or 0)
    middle_stages = p.pp - (p.first_stage_num_layers is not None) - (p.last_stage_num_layers is not None)
    if middle_layers < 0 or (middle_stages > 0 and middle_layers % middle_stages) or (
        middle_stages == 0 and middle_layers
    ):
        raise ConfigError(
            f"model.num_layers={m.num_layers} cannot be split over parallel.pp={p.pp} stages "
            f"(first={p.first_stage_num_layers}, last={p.last_stage_num_layers})"
        )
    if p.vpp is not None:
        if p.pp < 2:
            raise ConfigError("parallel.vpp needs parallel.pp >= 2 (virtual stages interleave pipeline ranks)")
        if p.first_stage_num_layers is not None or p.last_stage_num_layers is not None:
            raise ConfigError("parallel.vpp with an uneven first/last stage is not supported; drop one of them")
        if m.num_layers % (p.pp * p.vpp):
            raise ConfigError(
                f"model.num_layers={m.num_layers} is not divisible by parallel.pp*parallel.vpp={p.pp * p.vpp}"
            )
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1")

    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not divisible by tp*pp*cp={p.tp}*{p.pp}*{p.cp}={model_parallel}; "
            f"launch a multiple of {model_parallel} processes"
        )
    dp = world_size // model_parallel
    _validate_sizes(cfg)
    if m.deterministic_mode:
        _validate_deterministic(m.transformer_impl)
    if (dp * p.cp) % p.ep:
        raise ConfigError(f"parallel.ep={p.ep} must divide dp*cp={dp * p.cp}")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size*dp={t.micro_batch_size}*{dp}={t.micro_batch_size * dp}"
        )
    num_micro = t.global_batch_size // (t.micro_batch_size * dp)
    if p.vpp is not None and num_micro % p.pp:
        raise ConfigError(
            f"interleaved pipeline needs the number of microbatches ({num_micro}) to be a multiple of "
            f"parallel.pp={p.pp}; change train.global_batch_size"
        )
    if t.timing_log_level is not None and t.timing_log_level not in (0, 1, 2):
        raise ConfigError(f"train.timing_log_level must be null, 0, 1 or 2, got {t.timing_log_level}")
    if t.steps < 1:
        raise ConfigError(f"train.steps must be >= 1, got {t.steps}")
    if cfg.data.seq_length % max(1, 2 * p.cp) and p.cp > 1:
        raise ConfigError(f"data.seq_length={cfg.data.seq_length} must be divisible by 2*parallel.cp={2 * p.cp}")
    if m.fp8 is not None and m.transformer_impl == "local":
        raise ConfigError("model.fp8 needs model.transformer_impl=transformer_engine (or auto with TE installed)")
    if m.fp8 is not None and m.fp8_recipe == "mxfp8":
        _require_blackwell()
    if p.cp > 1 and cfg.omni is None and not _transformer_engine(m.transformer_impl):
        raise ConfigError(
            f"parallel.cp={p.cp} needs Transformer Engine attention (megatron's local attention has no "
            "context parallelism); run with TE on GPU or set parallel.cp=1"
        )
    if m.packed_attention == "te" and not _transformer_engine(m.transformer_impl):
        raise ConfigError("model.packed_attention=te needs Transformer Engine layers (CUDA, "
                          "transformer-engine[pytorch], model.transformer_impl auto or transformer_engine); "
                          "use model.packed_attention=auto or torch")
    _validate_moe(cfg)
    if cfg.omni is not None:
        if cfg.parallel.cp > 1:
            _validate_omni_cp(cfg)
        if not cfg.data.mock and not (cfg.data.omni_blend and cfg.data.root):
            raise ConfigError("an omni run needs data.omni_blend (a stage blend YAML, e.g. configs/data/pt3.yaml) "
                              "and data.root (its manifests' folder; tools/make_demo_data.py --out DIR builds the "
                              "demo one), or data.mock=true")
    elif not cfg.data.blend:
        raise ConfigError("data.blend is empty: name at least one data source (path: ..., weight: ...)")


# (key, lowest allowed value, allow null): sizes and intervals that crash later when 0 or negative
_MINIMUMS = (
    ("train.micro_batch_size", 1, False), ("train.global_batch_size", 1, False), ("train.log_interval", 1, False),
    ("data.seq_length", 1, False), ("train.save_interval", 1, True), ("train.exit_interval", 1, True),
    ("train.eval_interval", 1, True), ("train.eval_iters", 1, False), ("train.keep_last_checkpoints", 1, True),
    ("train.skip_nonfinite_steps", 0, False), ("train.loss_spike_window", 1, False), ("data.bad_window", 1, False),
    ("data.num_workers", 0, False),
    ("data.lookahead", 1, False), ("data.lookahead_mib", 0, True), ("data.prefetch", 0, False),
    ("data.decode_workers", 0, False),
    ("optimizer.lr", 0, False), ("optimizer.min_lr", 0, False), ("optimizer.lr_warmup_steps", 0, False),
    ("optimizer.lr_decay_steps", 1, True), ("optimizer.clip_grad", 0, False),
    ("parallel.distributed_timeout_minutes", 1, False),
)


def _transformer_engine(transformer_impl: str) -> bool:
    """Whether the layers will be Transformer Engine's here.  A probe of the installed kernels (torch and
    importlib only), imported when a check needs it so that `import megatron_omni.config` stays a leaf."""
    from megatron_omni.models.kernels import detect_kernels

    return detect_kernels(transformer_impl).transformer_engine


def _validate_omni_cp(cfg: RunConfig) -> None:
    """Context parallelism of an omni run: THD packed rows split with the 2*cp chunk rule
    (parallel/context_parallel.py), attention by TE's CP (`te`) or the all-gather-KV `torch` path."""
    p, m = cfg.parallel, cfg.model
    te = _transformer_engine(m.transformer_impl)
    backend = ("te" if te else "torch") if m.packed_attention == "auto" else m.packed_attention
    if backend == "dense":
        raise ConfigError(f"parallel.cp={p.cp} needs a THD packed attention path (model.packed_attention auto, te or "
                          "torch): the dense block-diagonal mask has no context parallelism")
    if p.pp > 1:
        raise ConfigError(f"parallel.cp={p.cp} with parallel.pp={p.pp} is not supported for omni runs yet: padding "
                          "each sample to a multiple of 2*cp makes the per-rank token count vary per microbatch, "
                          "and the pipeline sends fixed shapes; use parallel.pp=1 with cp")
    if cfg.dpo is not None:
        raise ConfigError(f"parallel.cp={p.cp} does not run preference (DPO) rows yet: their loss needs whole-sample "
                          "log-probs, split over the CP ranks; set parallel.cp=1")


def _require_blackwell() -> None:
    """MXFP8 (microscaled FP8) is a Blackwell tensor-core format: compute capability >= 10.0."""
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("model.fp8_recipe=mxfp8 needs a Blackwell GPU (compute capability >= 10.0) and none is "
                          "visible; use model.fp8_recipe=delayed or tensorwise")
    major, minor = torch.cuda.get_device_capability()
    if major < 10:
        raise ConfigError(f"model.fp8_recipe=mxfp8 needs a Blackwell GPU (compute capability >= 10.0), this one is "
                          f"{major}.{minor} ({torch.cuda.get_device_name()}); use model.fp8_recipe=delayed or "
                          "tensorwise (Hopper FP8)")


def _validate_deterministic(transformer_impl: str) -> None:
    """model.deterministic_mode on a GPU: the environment variables cuBLAS and Transformer Engine
    read when they start (setting them from inside the run would be too late)."""
    import os

    import torch

    if not torch.cuda.is_available():
        return
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (":4096:8", ":16:8"):
        raise ConfigError("model.deterministic_mode=true needs CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment "
                          "(torch's deterministic cuBLAS GEMMs); export it before launching")
    if _transformer_engine(transformer_impl) and os.environ.get("NVTE_ALLOW_NONDETERMINISTIC_ALGO") != "0":
        raise ConfigError("model.deterministic_mode=true with Transformer Engine needs "
                          "NVTE_ALLOW_NONDETERMINISTIC_ALGO=0 in the environment (TE's deterministic attention "
                          "kernels); export it before launching")


def _validate_sizes(cfg: RunConfig) -> None:
    for dotted, lowest, nullable in _MINIMUMS:
        value = _get(cfg, dotted)
        if value is None and nullable:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < lowest:
            raise ConfigError(f"{dotted}={value!r} must be a number >= {lowest}" + (" (or null)" if nullable else ""))
    factor = cfg.train.loss_spike_factor
    if factor is not None and not factor > 1:  # the loader already refused non-numbers
        raise ConfigError(f"train.loss_spike_factor={factor!r} must be a number > 1 (a step's loss over the median "
                          "of the last train.loss_spike_window steps), or null to switch the spike log off")
    if cfg.data.seq_length > cfg.model.max_position_embeddings:
        raise ConfigError(f"data.seq_length={cfg.data.seq_length} exceeds model.max_position_embeddings="
                          f"{cfg.model.max_position_embeddings} (the longest sequence the model is for, the HF "
                          "config's max_position_embeddings on export); shorten data.seq_length or raise "
                          "model.max_position_embeddings")
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction={cfg.data.max_bad_fraction} must be in [0, 1] (the share of the "
                          "last data.bad_window samples of a modality that may be unusable)")


def _validate_moe(cfg: RunConfig) -> None:
    """model.moe and expert parallelism (megatron would assert deep inside layer construction)."""
    moe, p = cfg.model.moe, cfg.parallel
    if moe is None:
        if p.ep > 1:
            raise ConfigError(f"parallel.ep={p.ep} needs an MoE model: add a model.moe section or set parallel.ep=1")
        return
    choices = {
        "router_type": ("topk", "topp"),
        "token_dispatcher_type": ("alltoall", "allgather"),
        "token_drop_policy": ("probs", "position"),
    }
    for key, allowed in choices.items():
        if getattr(moe, key) not in allowed:
            raise ConfigError(f"model.moe.{key}={getattr(moe, key)!r} is not one of {list(allowed)}")
    if moe.num_experts < 1 or moe.num_null_experts < 0:
        raise ConfigError(
            f"model.moe needs num_experts >= 1 and num_null_experts >= 0, got {moe.num_experts}, {moe.num_null_experts}"
        )
    if moe.num_experts % p.ep:
        raise ConfigError(f"model.moe.num_experts={moe.num_experts} is not divisible by parallel.ep={p.ep}")
    if not 1 <= moe.router_topk <= moe.num_router_outputs:
        raise ConfigError(
            f"model.moe.router_topk={moe.router_topk} must be in [1, num_experts + num_null_experts = "
            f"{moe.num_router_outputs}]"
        )
    if moe.router_type == "topp" and not 0.0 < moe.router_topp <= 1.0:
        raise ConfigError(f"model.moe.router_topp={moe.router_topp} must be in (0, 1]")
    if moe.ffn_hidden_size % p.tp:
        raise ConfigError(f"model.moe.ffn_hidden_size={moe.ffn_hidden_size} is not divisible by parallel.tp={p.tp}")
    shared = moe.shared_expert_ffn_hidden_size
    if shared is not None and (shared < 1 or shared % p.tp):
        raise ConfigError(
            f"model.moe.shared_expert_ffn_hidden_size={shared} must be positive and divisible by parallel.tp={p.tp}"
        )
    if moe.shared_expert_gate and shared is None:
        raise ConfigError("model.moe.shared_expert_gate=true needs model.moe.shared_expert_ffn_hidden_size")
    if moe.capacity_factor is not None and moe.capacity_factor <= 0:
        raise ConfigError(f"model.moe.capacity_factor={moe.capacity_factor} must be > 0 (or null for dropless)")
    if moe.pad_expert_input_to_capacity and moe.capacity_factor is None:
        raise ConfigError("model.moe.pad_expert_input_to_capacity=true needs model.moe.capacity_factor")
    if moe.expected_null_rate is not None and not 0.0 <= moe.expected_null_rate < 1.0:
        raise ConfigError(f"model.moe.expected_null_rate={moe.expected_null_rate} must be in [0, 1)")
    if p.tp > 1 and not p.sequence_parallel:
        raise ConfigError("an MoE model with parallel.tp > 1 needs parallel.sequence_parallel=true (megatron MoE rule)")
