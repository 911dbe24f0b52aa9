"""The one error a conversion raises: every problem found, listed, before anything is written."""

from __future__ import annotations

from typing import Dict, List, Sequence

# How many entries of one problem list the message shows before summarising the rest.
_SHOWN = 25


class ConversionError(RuntimeError):
    """A conversion that cannot be done exactly.

    `problems` maps a heading ("source tensors not consumed", "target tensors not written",
    "shape mismatches", "unsupported config", "unreadable files", ...) to its entries; the
    message lists them all (first 25 of each), so one run shows everything that is wrong.
    """

    def __init__(self, what: str, problems: Dict[str, Sequence[str]]):
        self.what = what
        self.problems: Dict[str, List[str]] = {k: list(v) for k, v in problems.items() if v}
        super().__init__(self._format())

    def _format(self) -> str:
        lines = [f"{self.what}: conversion refused, nothing was written"]
        for heading, entries in self.problems.items():
            lines.append(f"  {heading} ({len(entries)}):")
            for entry in entries[:_SHOWN]:
                lines.append(f"    - {entry}")
            if len(entries) > _SHOWN:
                lines.append(f"    ... and {len(entries) - _SHOWN} more")
        return "\n".join(lines)


class ProblemList:
    """Collects problems under headings; `raise_if_any` turns them into one ConversionError."""

    def __init__(self, what: str):
        self.what = what
        self.problems: Dict[str, List[str]] = {}

    def add(self, heading: str, entry: str) -> None:
        self.problems.setdefault(heading, []).append(entry)

    def extend(self, heading: str, entries: Sequence[str]) -> None:
        for entry in entries:
            self.add(heading, entry)

    def __bool__(self) -> bool:
        return any(self.problems.values())

    def raise_if_any(self) -> None:
        if self:
            raise ConversionError(self.what, self.problems)
