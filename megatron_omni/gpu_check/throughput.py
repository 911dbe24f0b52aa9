"""Group `throughput`: speed and memory of full-width models on one GPU, next to the planner.

* llm_8b_width_throughput: a Llama-3-8B-width decoder (hidden 4096, 32 heads, 8 KV groups, FFN
  14336, vocab 128256) with 4 layers, seq 8192, micro batch 1, bf16, trained through the project's
  loop: tokens/s, TFLOP/s and MFU with training/flops.py's formula, beside `tools/plan.py`'s
  prediction for the same one-GPU job (planner.search.evaluate), and the peak
  `torch.cuda.max_memory_allocated` beside the planner's memory estimate (without its fixed
  CUDA-context overhead, which the allocator does not see).
* vit_600m_throughput: M2-omni's ViT-600M (configs/model/vision_600m.yaml) forward + backward on a
  packed batch of images (one sequence, per-image attention): patches/s, TFLOP/s and MFU with
  training/encoder_flops.py.

With `--device cpu` the same code runs on tiny sizes (configs/model/tiny_llm.yaml, vision_tiny.yaml).
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Tuple

from megatron_omni.gpu_check.context import CheckContext, config_path
from megatron_omni.gpu_check.result import CheckResult, all_finite, judged, sig

CHECKS = ("llm_8b_width_throughput", "vit_600m_throughput")
BUDGET_S = {"quick": 100, "full": 170}

TEXT_CONFIG = config_path("tiny", "llm.yaml")
GIB = 1024 ** 3
# predicted vs measured within this factor counts as "planner agrees" (reported, not a failure)
PLANNER_AGREEMENT = 0.25


def llm_job(ctx: CheckContext) -> Tuple[List[str], int, int]:
    """(overrides of configs/tiny/llm.yaml, seq length, global batch)."""
    if ctx.cpu:
        seq, gbs = 256, 2
        model = ["model=" + config_path("model", "tiny_llm.yaml"), "train.precision=fp32"]
    else:
        seq, gbs = 8192, 2
        model = ["model=" + config_path("model", "llama3_8b.yaml"), "model.num_layers=4", "train.precision=bf16"]
    return [*model, f"data.seq_length={seq}", "train.micro_batch_size=1", f"train.global_batch_size={gbs}",
            # an 8B-width model at the tiny config's 3e-3 could diverge (DDP stops on a NaN gradient)
            "optimizer.lr_warmup_steps=0", "optimizer.lr=3.0e-4", "optimizer.min_lr=3.0e-5"], seq, gbs


def llm_steps(ctx: CheckContext) -> Tuple[int, int]:
    return (5, 2) if ctx.quick else (10, 3)


def vit_batch(ctx: CheckContext) -> Tuple[str, List[Tuple[int, int, int]], int]:
    """(vision config, grid_thw per image in patches, timed iterations)."""
    if ctx.cpu:
        return config_path("model", "vision_tiny.yaml"), [(1, 8, 8)] * 2, 2
    # 4 images of 448 x 448 = 4 x 1024 patches (1024 merged tokens), one packed sequence
    return config_path("model", "vision_600m.yaml"), [(1, 32, 32)] * 4, (4 if ctx.quick else 10)


def planner_prediction(ctx: CheckContext, cfg, transformer_engine: bool) -> Dict:
    """tools/plan.py's numbers for this one-GPU job at tp=pp=1, mbs 1, no recompute."""
    from megatron_omni.planner.cluster import make_cluster
    from megatron_omni.planner.layout import Job, Layout, check_layout
    from megatron_omni.planner.memory import MemoryAssumptions
    from megatron_omni.planner.search import Assumptions, evaluate
    from megatron_omni.training.flops import detect_device

    device = detect_device()
    gpu = device if device in ("h100", "h200", "a100") else "h200"
    job = Job(cfg.model, cfg.data.seq_length, cfg.train.global_batch_size, "bf16")
    layout = Layout(tp=1, pp=1, micro_batch=cfg.train.micro_batch_size, recompute="none")
    check_layout(job, layout, 1)
    # the local layer spec (no TE) runs megatron's unfused attention, which stores s^2 scores
    assumptions = Assumptions(memory=MemoryAssumptions(flash_attention=transformer_engine))
    est = evaluate(job, layout, make_cluster(gpu, 1), assumptions)
    mem = est.memory
    return {
        "gpu": gpu, "gpu_from": "detected" if gpu == device else f"assumed ({device} has no planner entry)",
        "flash_attention_assumed": transformer_engine,
        "tokens_per_s": est.tokens_per_s_per_gpu, "tflops_per_gpu": est.tflops_per_gpu, "mfu": est.mfu,
        "step_s": est.time.step_s, "memory_gib": mem.total_gib,
        "memory_gib_without_overhead": mem.total_gib - mem.overhead_gib, "memory": mem.as_dict(),
        "how": (f"planner.search.evaluate (what tools/plan.py --layout prices) for {cfg.model.num_layers} layers x "
                f"{cfg.model.hidden_size}, 1 x {gpu}, seq {job.seq_len}, GBS {job.global_batch}, bf16, "
                f"tp=1,pp=1,mbs={layout.micro_batch},recompute=none"),
    }


def plan(ctx: CheckContext) -> Dict[str, Dict]:
    from megatron_omni.config import load_config
    from megatron_omni.config.encoders import VisionConfig
    from megatron_omni.training import encoder_flops, flops

    overrides, seq, gbs = llm_job(ctx)
    cfg = load_config(TEXT_CONFIG, overrides)
    steps, warmup = llm_steps(ctx)
    vision_path, grids, iters = vit_batch(ctx)
    vision = VisionConfig.from_yaml(vision_path)
    import torch

    grid = torch.tensor(grids)
    return {
        "llm_8b_width_throughput": {
            "config": TEXT_CONFIG, "overrides": overrides, "steps": steps, "warmup": warmup,
            "model": {k: getattr(cfg.model, k) for k in ("num_layers", "hidden_size", "num_attention_heads",
                                                        "num_query_groups", "ffn_hidden_size", "vocab_size")},
            "flops_per_step": flops.llm_flops_per_step(cfg.model, gbs, seq),
            "planner": planner_prediction(ctx, cfg, transformer_engine=False),
        },
        "vit_600m_throughput": {
            "config": vision_path, "images": len(grids), "grid_thw": grids, "iterations": iters,
            "patches": int(grid.prod(-1).sum()),
            "training_flops_per_iteration": 3 * encoder_flops.vision_forward_flops(vision, grid),
        },
    }


def _llm(ctx: CheckContext) -> CheckResult:
    from megatron_omni.config import load_config
    from megatron_omni.gpu_check.runs import train_run
    from megatron_omni.models.kernels import detect_kernels

    overrides, seq, gbs = llm_job(ctx)
    cfg = load_config(TEXT_CONFIG, overrides)
    steps, warmup = llm_steps(ctx)
    run = train_run(TEXT_CONFIG, overrides, out=ctx.path("throughput", "llm", ""), steps=steps, warmup=warmup)
    te = detect_kernels(cfg.model.transformer_impl).transformer_engine
    pred = planner_prediction(ctx, cfg, transformer_engine=te)
    thr = run.summary["throughput"]
    numbers = {
        "tokens_per_s": thr["tokens_per_s"], "tflops_per_gpu": thr["tflops_per_gpu"], "mfu": thr["mfu"],
        "step_ms": run.summary["step_time_ms"]["mean"], "losses": run.losses,
        "peak_memory_gib": None if run.peak_memory_bytes is None else run.peak_memory_bytes / GIB,
        "transformer_engine": te, "planner": pred,
        "tokens_per_s_measured_over_predicted": thr["tokens_per_s"] / pred["tokens_per_s"],
    }
    if run.peak_memory_bytes is not None:
        numbers["peak_memory_over_planner"] = numbers["peak_memory_gib"] / pred["memory_gib_without_overhead"]
    agree = abs(numbers["tokens_per_s_measured_over_predicted"] - 1) <= PLANNER_AGREEMENT
    finite = all_finite(run.losses)
    mem = "" if run.peak_memory_bytes is None else (
        f"; peak {numbers['peak_memory_gib']:.1f} GiB vs planner {pred['memory_gib_without_overhead']:.1f} GiB")
    mfu = "n/a" if thr["mfu"] is None else f"{100 * thr['mfu']:.1f} %"
    return judged("llm_8b_width_throughput", finite and thr["tokens_per_s"] > 0,
                  f"{thr['tokens_per_s']:.0f} tokens/s, {sig(thr['tflops_per_gpu'])} TFLOP/s, MFU {mfu} "
                  f"(planner {pred['tokens_per_s']:.0f} tokens/s, {'within' if agree else 'outside'} "
                  f"{100 * PLANNER_AGREEMENT:.0f} %){mem}; {'TE' if te else 'local'} layers", **numbers)


def _vit(ctx: CheckContext) -> CheckResult:
    import torch

    from megatron_omni.config.schema import ParallelConfig
    from megatron_omni.config.encoders import VisionConfig
    from megatron_omni.models.vision.encoder import NaViTEncoder
    from megatron_omni.parallel.initialize import initialize_distributed
    from megatron_omni.training import encoder_flops, flops

    initialize_distributed(ParallelConfig())
    vision_path, grids, iters = vit_batch(ctx)
    vision = VisionConfig.from_yaml(vision_path)
    dtype = torch.float32 if ctx.cpu else torch.bfloat16
    device = torch.device("cpu" if ctx.cpu else "cuda")
    encoder = NaViTEncoder(vision, params_dtype=dtype).to(device)
    for p in encoder.parameters():  # without DDP: TE / apex weight-gradient fusion accumulates into main_grad
        p.main_grad = torch.zeros_like(p, dtype=torch.float32)
    grid = torch.tensor(grids)
    n = int(grid.prod(-1).sum())
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(n, vision.patch_dim, generator=gen).to(device=device, dtype=dtype)

    def step() -> float:
        out = encoder(pixels, grid)
        loss = out.float().pow(2).mean()
        loss.backward()
        return loss.item()  # syncs the device

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses = [step()]  # warm-up (kernel selection, allocator)
    start = time.perf_counter()
    for _ in range(iters):
        losses.append(step())
    seconds = (time.perf_counter() - start) / iters
    train_flops = 3 * encoder_flops.vision_forward_flops(vision, grid)
    tflops = train_flops / seconds / 1e12
    mfu = flops.mfu(tflops, flops.detect_device(), "bf16")
    merged = n // vision.spatial_merge_size ** 2
    numbers = {
        "images": len(grids), "patches": n, "merged_tokens": merged, "iteration_ms": 1e3 * seconds,
        "patches_per_s": n / seconds, "merged_tokens_per_s": merged / seconds, "tflops": tflops, "mfu": mfu,
        "transformer_engine": encoder.kernels.transformer_engine,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None,
    }
    finite = all_finite(losses)
    mfu_s = "n/a" if mfu is None else f"{100 * mfu:.1f} %"
    return judged("vit_600m_throughput", finite,
                  f"{n / seconds:.0f} patches/s ({merged / seconds:.0f} merged tokens/s) on {len(grids)} packed "
                  f"images, {sig(tflops)} TFLOP/s, MFU {mfu_s}", **numbers)


def run(ctx: CheckContext, emit: Callable[[CheckResult], None]) -> None:
    from megatron_omni.gpu_check.worker import guarded

    emit(guarded("llm_8b_width_throughput", lambda: _llm(ctx)))
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    emit(guarded("vit_600m_throughput", lambda: _vit(ctx)))
