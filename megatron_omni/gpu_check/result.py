"""One check's outcome: pass / fail / skipped (with the reason) and the numbers it measured."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional

PASS, FAIL, SKIPPED = "pass", "fail", "skipped"


@dataclass
class CheckResult:
    name: str
    status: str  # pass | fail | skipped
    reason: str = ""  # why it failed / was skipped, or what the pass criterion was
    numbers: Dict[str, Any] = field(default_factory=dict)
    seconds: Optional[float] = None

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "CheckResult":
        return cls(name=d["name"], status=d["status"], reason=d.get("reason", ""),
                   numbers=d.get("numbers", {}), seconds=d.get("seconds"))


def skipped(name: str, reason: str, **numbers) -> CheckResult:
    return CheckResult(name, SKIPPED, reason, numbers)


def judged(name: str, ok: bool, criterion: str, **numbers) -> CheckResult:
    """pass when `ok`, else fail; `criterion` says what was compared against what."""
    return CheckResult(name, PASS if ok else FAIL, criterion, numbers)


def max_rel_diff(values, reference) -> float:
    """max_i |v_i - r_i| / max(|r_i|, 1e-12); inf when the lengths differ or a value is not finite."""
    values, reference = list(values), list(reference)
    if len(values) != len(reference) or not values:
        return math.inf
    out = 0.0
    for v, r in zip(values, reference):
        if not (math.isfinite(v) and math.isfinite(r)):
            return math.inf
        out = max(out, abs(v - r) / max(abs(r), 1e-12))
    return out


def all_finite(values) -> bool:
    return all(math.isfinite(v) for v in values)


def sig(x) -> str:
    """A number for a one-line reason: 3 significant digits, or n/a."""
    return "n/a" if x is None else f"{x:.3g}"
