"""DIR/gpu_check.json and DIR/gpu_check.md: the environment, then one row per check."""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
from typing import Dict, List, Optional, Sequence

from megatron_omni.gpu_check.context import CheckContext
from megatron_omni.gpu_check.result import FAIL, PASS, SKIPPED, CheckResult

OPTIONAL = ("transformer_engine", "apex", "nvidia.dali", "av")


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def environment() -> Dict:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": cuda, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "device_count": torch.cuda.device_count() if cuda else 0,
        "megatron_core": _version("megatron-core") or _version("megatron_core"),
        "optional": {m: _present(m) for m in OPTIONAL},
    }


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)) and len(v) > 6:
        return "[" + ", ".join(_fmt(x) for x in v[:6]) + ", ...]"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def render_markdown(report: Dict) -> str:
    env = report["environment"]
    s = report["summary"]
    opt = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in env["optional"].items())
    lines = [
        "# GPU check", "",
        f"`{report['command']}` on {env['device']} (torch {env['torch']}, CUDA {env['cuda']}, megatron-core "
        f"{env['megatron_core']}, Python {env['python']}; {opt}), {report['started']}, "
        f"{report['seconds']:.0f} s, mode {report['mode']}.", "",
        f"**{s[PASS]} pass, {s[FAIL]} fail, {s[SKIPPED]} skipped**"
        + (f", not reached: {', '.join(report['pending'])}" if report["pending"] else ""), "",
        "| check | status | result / reason | s |", "| --- | --- | --- | --- |",
    ]
    for c in report["checks"]:
        reason = c["reason"].replace("|", "/").replace("\n", " ")
        lines.append(f"| {c['name']} | {c['status']} | {reason} | {c['seconds'] or 0:.1f} |")
    lines += ["", "## Numbers", ""]
    for c in report["checks"]:
        if not c["numbers"]:
            continue
        lines.append(f"### {c['name']}")
        for k, v in c["numbers"].items():
            if isinstance(v, dict):
                lines.append(f"- {k}: " + ", ".join(f"{kk} {_fmt(vv)}" for kk, vv in v.items()
                                                     if not isinstance(vv, dict)))
            else:
                lines.append(f"- {k}: {_fmt(v)}")
        lines.append("")
    return "\n".join(lines) + "\n"


def write_report(ctx: CheckContext, results: List[CheckResult], env: Dict, *, seconds: float,
                 argv: Sequence[str] = (), pending: Sequence[str] = ()) -> Dict:
    checks = [r.as_dict() for r in results]
    report = {
        "command": " ".join(["python tools/gpu_check.py", *argv]),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": "quick" if ctx.quick else "full", "device_mode": ctx.device, "seconds": seconds,
        "environment": env,
        "summary": {k: sum(c["status"] == k for c in checks) for k in (PASS, FAIL, SKIPPED)},
        "pending": list(pending), "checks": checks,
    }
    os.makedirs(ctx.out, exist_ok=True)
    with open(os.path.join(ctx.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(ctx.out, "gpu_check.md"), "w") as f:
        f.write(render_markdown(report))
    return report
