"""tools/plan.py: the JSON contract (issue #7), --layout, errors, the readable table."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLAN = os.path.join(ROOT, "tools", "plan.py")
CONTRACT = [
    "--model", "configs/model/llama3_70b.yaml", "--gpus", "64", "--gpu", "h100",
    "--seq-len", "8192", "--global-batch", "256", "--precision", "fp8",
]
LAYOUT_KEYS = {"tp", "pp", "vpp", "cp", "dp", "ep", "micro_batch", "recompute", "memory_gib_per_gpu",
               "tokens_per_s_per_gpu", "tflops_per_gpu", "mfu"}


def run_json(*extra: str) -> dict:
    proc = subprocess.run([sys.executable, PLAN, *CONTRACT, "--json", *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # the whole of stdout is one JSON object


@pytest.fixture(scope="module")
def plan_module():
    spec = importlib.util.spec_from_file_location("plan_cli", PLAN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_contract_json_search():
    out = run_json()
    assert out["flops_per_token"] == pytest.approx(4.49e11, rel=2e-3)
    layouts = out["layouts"]
    assert 1 <= len(layouts) <= 10
    for d in layouts:
        assert LAYOUT_KEYS <= set(d), LAYOUT_KEYS - set(d)
        assert d["tp"] * d["pp"] * d["cp"] * d["dp"] == 64
        assert d["memory_gib_per_gpu"] <= 80 and d["fits"]
        assert 0 < d["mfu"] < 1
    speeds = [d["tokens_per_s_per_gpu"] for d in layouts]
    assert speeds == sorted(speeds, reverse=True)
    assert [a["calibration"] for a in out["anchors"]].count(True) == 2


def test_contract_json_single_layout_reproduces_the_calibration_fit(plan_module, capsys):
    """The JSON of one layout.  Its numbers are a fit, not evidence: this is the FP8 calibration anchor
    the efficiency was fitted on (the held-out anchors are tested in test_planner_model.py).
    In-process (the subprocess test above already covers stdout being pure JSON)."""
    rc = plan_module.main([*CONTRACT, "--json", "--layout", "tp=4,pp=8,vpp=5"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["layouts"]) == 1
    d = out["layouts"][0]
    assert (d["tp"], d["pp"], d["vpp"], d["cp"], d["dp"], d["ep"], d["micro_batch"]) == (4, 8, 5, 1, 2, 1, 1)
    # Megatron-Bridge measured 1633 tokens/s/GPU and 734 TFLOP/s/GPU for this run (the fitted calibration row).
    assert d["tokens_per_s_per_gpu"] == pytest.approx(1633, rel=0.10)
    assert d["tflops_per_gpu"] == pytest.approx(734, rel=0.10)
    assert d["mfu"] == pytest.approx(734 / 1979, rel=0.10)


@pytest.mark.parametrize(
    "layout, message",
    [
        ("tp=3,pp=8", "64 GPUs are not divisible by tp*pp*cp=3*8*1=24"),
        ("tp=4,pp=8,vpp=3", "model.num_layers=80 is not divisible by parallel.pp*parallel.vpp=24"),
        ("tp=4,pp=8,bogus=1", "unknown key 'bogus'"),
    ],
)
def test_invalid_layout_is_a_one_line_error(plan_module, capsys, layout, message):
    rc = plan_module.main([*CONTRACT, "--json", "--layout", layout])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    assert f"plan.py: error: invalid layout '{layout}': " in err and message in err


def test_heads_not_divisible_by_tp(plan_module, capsys):
    rc = plan_module.main(["--model", "configs/model/llama3_70b.yaml", "--gpus", "48", "--global-batch", "96",
                           "--layout", "tp=3"])
    assert rc == 2
    assert "model.num_attention_heads=64 is not divisible by parallel.tp=3" in capsys.readouterr().err


def test_table_prints_anchors_beside_prediction(plan_module, capsys):
    rc = plan_module.main([*CONTRACT, "--top", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "tok/s/GPU" in out and "Compute efficiency used: bf16 0.62" in out
    assert "measured 1633 tok/s/GPU" in out and "measured 54.0% MFU" in out and "ratio" in out


def test_no_feasible_layout_reports_closest(plan_module, capsys):
    rc = plan_module.main(["--model", "configs/model/llama3_70b.yaml", "--gpus", "8", "--global-batch", "64",
                           "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["layouts"] == [] and out["search"]["feasible"] == 0
    assert out["closest"] and all(not d["fits"] for d in out["closest"])
