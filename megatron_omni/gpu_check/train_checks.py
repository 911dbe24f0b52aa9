"""Group `train`: the tiny omni model on CUDA without emulation.

* cuda_fp32_vs_cpu: 5 fp32 steps on the GPU (TF32 off) vs the same seed on the CPU (CUDA emulated,
  one rank, a child process started first so both run at once): every step's loss within 1e-4.
* bf16_vs_fp32: the bf16 run (Float16Module + fp32 main params, megatron's mixed-precision
  optimizer) vs the fp32 run: every step's loss within 1e-2 relative.
* omni_loader_wait: the omni loader's wait (microbatch fetch before the schedule + waits inside it)
  as a share of the bf16 run's step, from the profiler's timers; on the demo data with --data-root,
  else on mock rows.
"""

from __future__ import annotations

from typing import Callable, Dict, List

from megatron_omni.gpu_check.context import CheckContext, config_path
from megatron_omni.gpu_check.result import FAIL, CheckResult, judged, max_rel_diff

CHECKS = ("cuda_fp32_vs_cpu", "bf16_vs_fp32", "omni_loader_wait")
BUDGET_S = {"quick": 110, "full": 170}

CONFIG = config_path("tiny", "omni_mock.yaml")
STEPS = 5
FP32_TOL, BF16_TOL = 1e-4, 1e-2


def _overrides(precision: str) -> List[str]:
    return [f"train.precision={precision}"]


def _bf16_steps(ctx: CheckContext) -> int:
    return STEPS if ctx.quick else 8


def data_run(ctx: CheckContext):
    """(config, overrides) of the loader-wait run: the demo data's PT-3 stage, or None = the bf16 mock run."""
    if not ctx.data_root:
        return None
    return config_path("tiny", "pt_stage3.yaml"), [f"data.root={ctx.data_root}", "train.precision=bf16"]


def plan(ctx: CheckContext) -> Dict[str, Dict]:
    from megatron_omni.config import load_config

    for p in ("fp32", "bf16"):
        load_config(CONFIG, _overrides(p))
    data = data_run(ctx)
    if data is not None:
        load_config(*data)
    return {
        "cuda_fp32_vs_cpu": {"config": CONFIG, "overrides": _overrides("fp32"), "steps": STEPS,
                             "reference": "same run on CPU (CUDA emulated), 1 rank, child process",
                             "tolerance_rel": FP32_TOL},
        "bf16_vs_fp32": {"config": CONFIG, "overrides": _overrides("bf16"), "steps": _bf16_steps(ctx),
                         "reference": "the fp32 GPU run's losses", "tolerance_rel": BF16_TOL},
        "omni_loader_wait": {"config": data[0] if data else CONFIG, "overrides": data[1] if data else "the bf16 run",
                             "data": ctx.data_root or "mock rows (data.mock=true)"},
    }


def _wait_share(summary) -> Dict[str, float]:
    split = summary["stages"][0]["split"]
    step = split["step"]
    return {"data_wait_ms": split["data_wait"], "step_ms": step,
            "wait_share": split["data_wait"] / step if step > 0 else float("nan")}


def run(ctx: CheckContext, emit: Callable[[CheckResult], None]) -> None:
    import traceback

    from megatron_omni.gpu_check.runs import finish_reference, set_fp32_exact, start_cpu_reference, train_run
    from megatron_omni.gpu_check.worker import error_text

    fp32 = _overrides("fp32")
    ref_out = ctx.path("train", "cpu_fp32", "")
    reference = start_cpu_reference(CONFIG, fp32, out=ref_out, steps=STEPS)
    gpu_fp32 = fp32_error = None
    try:
        set_fp32_exact(True)
        gpu_fp32 = train_run(CONFIG, fp32, out=ctx.path("train", "gpu_fp32", ""), steps=STEPS)
    except Exception as e:  # noqa: BLE001 - reported; the bf16 run and the loader check still run
        traceback.print_exc()
        fp32_error = error_text(e)
    finally:
        set_fp32_exact(False)
    cpu_losses = finish_reference(reference, ref_out, timeout=BUDGET_S["full"])
    if gpu_fp32 is None:
        emit(CheckResult("cuda_fp32_vs_cpu", FAIL, f"the fp32 {ctx.device} run failed: {fp32_error}",
                         {"cpu_losses": cpu_losses}))
    else:
        d = max_rel_diff(gpu_fp32.losses, cpu_losses)
        emit(judged("cuda_fp32_vs_cpu", d <= FP32_TOL,
                    f"{STEPS} fp32 steps on {ctx.device} vs the CPU-emulated run of the same seed: "
                    f"max relative loss difference {d:.2e} (tolerance {FP32_TOL:g})",
                    device_losses=gpu_fp32.losses, cpu_losses=cpu_losses, max_rel_diff=d))

    bf16 = bf16_error = None
    try:
        bf16 = train_run(CONFIG, _overrides("bf16"), out=ctx.path("train", "gpu_bf16", ""),
                         steps=_bf16_steps(ctx), warmup=2)
    except Exception as e:  # noqa: BLE001 - reported as this check's failure; the loader check goes on
        traceback.print_exc()
        bf16_error = error_text(e)
    if bf16 is None:
        emit(CheckResult("bf16_vs_fp32", FAIL, f"the bf16 run failed: {bf16_error}"))
    elif gpu_fp32 is None:
        emit(CheckResult("bf16_vs_fp32", FAIL, "the bf16 run ran but the fp32 run it is compared with failed",
                         {"bf16_losses": bf16.losses}))
    else:
        n = min(len(bf16.losses), len(gpu_fp32.losses))
        d = max_rel_diff(bf16.losses[:n], gpu_fp32.losses[:n])
        emit(judged("bf16_vs_fp32", d <= BF16_TOL,
                    f"bf16 (Float16Module + fp32 main params) vs fp32, steps 1-{n}: max relative loss difference "
                    f"{d:.2e} (tolerance {BF16_TOL:g})",
                    bf16_losses=bf16.losses, fp32_losses=gpu_fp32.losses, max_rel_diff=d,
                    bf16_step_ms=bf16.summary["step_time_ms"]["mean"], peak_memory_bytes=bf16.peak_memory_bytes))

    data = data_run(ctx)
    if data is not None:
        summary = train_run(*data, out=ctx.path("train", "loader", ""), steps=_bf16_steps(ctx), warmup=2).summary
        source = f"demo data {ctx.data_root} (PT-3 blend)"
    else:
        run_ = bf16 or gpu_fp32
        if run_ is None:
            raise RuntimeError("both the fp32 and the bf16 runs failed: no step to measure the loader wait in")
        summary = run_.summary
        source = (f"mock rows (data.mock=true) of the {'bf16' if bf16 else 'fp32 (bf16 failed)'} run; "
                  "--data-root DIR for the demo data")
    share = _wait_share(summary)
    ok = share["wait_share"] == share["wait_share"]  # measured (not NaN)
    emit(judged("omni_loader_wait", ok,
                f"omni loader wait {100 * share['wait_share']:.1f} % of the step ({share['data_wait_ms']:.1f} of "
                f"{share['step_ms']:.1f} ms) on {source}", **share, source=source))
