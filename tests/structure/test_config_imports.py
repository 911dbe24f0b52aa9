"""`megatron_omni.config` is a leaf: importing it loads no model, training or megatron-core code.

Tools (planner, converters, data preparation) read run configs without building a model; the
schema's encoder sections therefore live in `config/encoders.py`, `config/moe.py`, and models
import them from there (one direction only).  Checked in a fresh interpreter, on `sys.modules`.

What may load, and why:
* `megatron_omni.config.*`: the package itself;
* `megatron_omni.balance.*`: the `balance:` section (`SchedulerConfig`) and its package (torch-only
  scheduling code, no model);
* `megatron_omni.rl.*`: the `gspo:` section (`GSPOConfig`) checks its choices against
  `rl.gspo.GSPO_VARIANTS` / `rl.advantages.STD_KINDS` (torch-only loss helpers, no model).
Nothing of megatron-core may load (`megatron.*`: its transformer / GPT classes were pulled in by the
encoder configs before), nor `megatron_omni.models`, `.training`, `.data`, `.parallel`, `.convert`,
`.profiling`, `.inference`: no prefix outside the three above is allowed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ALLOWED = ("megatron_omni.config", "megatron_omni.balance", "megatron_omni.rl")


def test_import_config_loads_no_model_or_training_code():
    code = ("import json, sys; import megatron_omni.config; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('megatron', 'megatron_omni'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert "megatron_omni.config.schema" in loaded  # the probe really imported the package
    megatron_core = [m for m in loaded if m.split(".")[0] == "megatron"]
    assert not megatron_core, f"import megatron_omni.config loads megatron-core: {megatron_core[:8]}"
    outside = [m for m in loaded if m != "megatron_omni" and not any(m == a or m.startswith(a + ".") for a in ALLOWED)]
    assert not outside, f"import megatron_omni.config loads modules outside {ALLOWED}: {outside}"
