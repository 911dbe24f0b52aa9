"""What every check is told: where it runs (cuda, or cpu for a logic trial), how long it may take
(--quick), where it writes, and the sizes of its models (full-size on a GPU, tiny on CPU)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class CheckContext:
    out: str  # the run folder (DIR of --out)
    device: str = "cuda"  # cuda | cpu (cpu: tiny sizes, to try the logic without a GPU)
    quick: bool = False
    dry_run: bool = False
    data_root: Optional[str] = None  # demo data for the loader check (tools/make_demo_data.py); None = mock rows

    @property
    def cpu(self) -> bool:
        return self.device == "cpu"

    def path(self, *parts: str) -> str:
        p = os.path.join(self.out, *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "CheckContext":
        return cls(**json.loads(text))


def config_path(*parts: str) -> str:
    return os.path.join(REPO, "configs", *parts)
