"""Run the check groups, each in its own child process under a time limit (a crash, a hang or a CUDA
error in one group cannot take the others down), and collect their results; or, for --dry-run,
build every check's configuration in this process and list what would run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from megatron_omni.gpu_check.context import CheckContext
from megatron_omni.gpu_check.groups import GROUPS, group
from megatron_omni.gpu_check.report import environment, write_report
from megatron_omni.gpu_check.result import FAIL, SKIPPED, CheckResult

# Whole-run limits (s): the 8 min (4 with --quick) minus process start-up and slack.
TOTAL_BUDGET_S = {"quick": 220, "full": 450}
MIN_GROUP_S = 20  # a group is not started with less than this left
CPU_GROUP_LIMIT_S = 900  # --device cpu (logic trial on tiny sizes): CPUs are slow, no budget


def mode(ctx: CheckContext) -> str:
    return "quick" if ctx.quick else "full"


def select_groups(only: Optional[Sequence[str]]) -> List[str]:
    if not only:
        return list(GROUPS)
    for name in only:
        group(name)  # unknown -> ValueError naming the groups
    return [g for g in GROUPS if g in only]


def plan_all(ctx: CheckContext, groups: Sequence[str]) -> Dict[str, Dict]:
    """Every check's configuration, built (configs loaded and validated, modules imported)."""
    out: Dict[str, Dict] = {}
    for g in groups:
        mod = group(g)
        planned = mod.plan(ctx)
        missing = [c for c in mod.CHECKS if c not in planned]
        if missing:
            raise RuntimeError(f"group {g}: plan() did not describe {missing}")
        for name in mod.CHECKS:
            out[name] = {"group": g, "time_limit_s": mod.BUDGET_S[mode(ctx)], **planned[name]}
    return out


def _read_results(path: str) -> Dict[str, CheckResult]:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {r.name: r for r in (CheckResult.from_dict(json.loads(line)) for line in f if line.strip())}


def _log_tail(path: str, lines: int = 3) -> str:
    try:
        with open(path, errors="replace") as f:
            tail = [s.strip() for s in f.readlines()[-lines:] if s.strip()]
    except OSError:
        return ""
    return " | ".join(tail)[-400:]


def run_group(ctx: CheckContext, name: str, limit_s: float) -> List[CheckResult]:
    from megatron_omni.gpu_check.runs import child_env

    mod = group(name)
    results_path, log_path = ctx.path("logs", f"{name}.results.jsonl"), ctx.path("logs", f"{name}.log")
    if os.path.exists(results_path):
        os.remove(results_path)
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "megatron_omni.gpu_check.worker", "--group", name, "--ctx", ctx.to_json(),
             "--results", results_path],
            env=child_env(cpu=ctx.cpu), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=limit_s), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group and its children (CPU reference runs)
            rc, timed_out = proc.wait(), True
    took = time.monotonic() - start
    done = _read_results(results_path)
    why = (f"group '{name}' timed out after {limit_s:.0f} s" if timed_out
           else f"group '{name}' exited with code {rc} before this check reported")
    tail = _log_tail(log_path)
    out = []
    for check in mod.CHECKS:
        out.append(done.get(check) or CheckResult(check, FAIL, f"{why}; log {log_path}: {tail}", seconds=took))
    return out


def run_all(ctx: CheckContext, groups: Sequence[str], *, argv: Sequence[str] = (),
            budget_s: Optional[float] = None) -> Dict:
    """Run `groups` in order within `budget_s` (default TOTAL_BUDGET_S of the mode; none on CPU);
    gpu_check.json / .md are rewritten after every group (a killed run keeps what finished)."""
    env = environment()
    start = time.monotonic()
    budget = budget_s if budget_s is not None else (None if ctx.cpu else TOTAL_BUDGET_S[mode(ctx)])
    results: List[CheckResult] = []
    pending = {g: list(group(g).CHECKS) for g in groups}
    for g in groups:
        left = None if budget is None else budget - (time.monotonic() - start)
        if left is not None and left < MIN_GROUP_S:
            group_results = [CheckResult(c, SKIPPED, f"time budget of {budget:.0f} s used up before group '{g}'")
                             for c in group(g).CHECKS]
        else:
            limit = group(g).BUDGET_S[mode(ctx)] if not ctx.cpu else CPU_GROUP_LIMIT_S
            limit = limit if left is None else min(limit, left)
            print(f"gpu_check: group {g} ({', '.join(pending[g])}), limit {limit:.0f} s", flush=True)
            group_results = run_group(ctx, g, limit)
        pending.pop(g)
        results += group_results
        for r in group_results:
            print(f"gpu_check:   {r.name}: {r.status} ({r.seconds or 0:.1f} s) {r.reason}", flush=True)
        write_report(ctx, results, env, seconds=time.monotonic() - start, argv=argv,
                     pending=[c for cs in pending.values() for c in cs])
    return write_report(ctx, results, env, seconds=time.monotonic() - start, argv=argv)
