"""Child-process entry points of the GPU check.

    python -m megatron_omni.gpu_check.worker --group NAME --ctx JSON --results FILE
        runs one check group, appending one JSON line per finished check to FILE (so a crash or a
        timeout keeps what already finished);
    python -m megatron_omni.gpu_check.worker --train-run JSON
        one training run ({"config", "overrides", "out", "steps"}): the CPU reference of a check.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from typing import Callable, List, Optional

from megatron_omni.gpu_check.result import FAIL, CheckResult


def error_text(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    where = f" at {frames[-1].filename.split('/')[-1]}:{frames[-1].lineno}" if frames else ""
    return f"{type(e).__name__}: {e}{where}"


def guarded(name: str, fn: Callable[[], CheckResult]) -> CheckResult:
    """fn() timed; an exception becomes a failed check naming it (the traceback goes to the log)."""
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - an acceptance check reports every failure
        traceback.print_exc()
        result = CheckResult(name, FAIL, error_text(e))
    result.seconds = time.perf_counter() - start
    return result


def run_group(name: str, ctx, results_path: str) -> int:
    from megatron_omni.gpu_check.groups import group

    module = group(name)
    done: List[str] = []
    last = [time.perf_counter()]

    def emit(result: CheckResult) -> None:
        now = time.perf_counter()
        if result.seconds is None:
            result.seconds = now - last[0]
        last[0] = now
        done.append(result.name)
        with open(results_path, "a") as f:
            f.write(json.dumps(result.as_dict(), default=str) + "\n")
        print(f"gpu_check: {result.name}: {result.status} - {result.reason}", flush=True)

    try:
        module.run(ctx, emit)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        for check in module.CHECKS:
            if check not in done:
                emit(CheckResult(check, FAIL, error_text(e)))
        return 1
    return 0


def train_run_main(spec_json: str) -> int:
    from megatron_omni.gpu_check.runs import train_run

    spec = json.loads(spec_json)
    train_run(spec["config"], spec["overrides"], out=spec["out"], steps=spec["steps"])
    return 0


def third_party_modules() -> List[str]:
    """Top-level non-stdlib modules this process imported (what a bare machine must have)."""
    names = {m.split(".")[0] for m in list(sys.modules)}
    return sorted(n for n in names if n not in sys.stdlib_module_names and not n.startswith("_")
                  and n != "megatron_omni")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_omni.gpu_check.worker")
    p.add_argument("--group")
    p.add_argument("--ctx")
    p.add_argument("--results")
    p.add_argument("--train-run")
    args = p.parse_args(argv)
    from megatron_omni.train import setup_logging

    setup_logging()
    from megatron_omni.parallel.initialize import destroy_distributed

    try:
        if args.train_run:
            return train_run_main(args.train_run)
        from megatron_omni.gpu_check.context import CheckContext

        rc = run_group(args.group, CheckContext.from_json(args.ctx), args.results)
        with open(args.results.replace(".results.jsonl", ".imports.json"), "w") as f:
            json.dump(third_party_modules(), f)
        return rc
    finally:
        destroy_distributed()


# Guard required: megatron's checkpoint writer spawns a process that re-imports __main__.
if __name__ == "__main__":
    sys.exit(main())
