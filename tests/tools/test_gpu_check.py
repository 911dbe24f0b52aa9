"""tools/gpu_check.py --dry-run on CPU builds every check's configuration (so the GPU script cannot
rot unseen) and the result / report helpers judge and render what the GPU run will write."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from megatron_omni.gpu_check.context import CheckContext
from megatron_omni.gpu_check.groups import all_checks
from megatron_omni.gpu_check.report import environment, write_report
from megatron_omni.gpu_check.result import FAIL, PASS, SKIPPED, CheckResult, judged, max_rel_diff, skipped

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_dry_run_plans_every_check(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "gpu_check.py"), "--out", str(tmp_path),
                           "--dry-run", "--quick"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads((tmp_path / "gpu_check_plan.json").read_text())["checks"]
    assert list(plan) == all_checks()
    for name in plan:
        assert name in proc.stdout
    llm = plan["llm_8b_width_throughput"]
    assert llm["model"] == {"num_layers": 4, "hidden_size": 4096, "num_attention_heads": 32, "num_query_groups": 8,
                            "ffn_hidden_size": 14336, "vocab_size": 128256}
    assert "data.seq_length=8192" in llm["overrides"] and "train.micro_batch_size=1" in llm["overrides"]
    # the planner's prediction for the same one-GPU job, priced here on CPU
    p = llm["planner"]
    assert p["tokens_per_s"] > 0 and 0 < p["mfu"] < 1
    assert p["memory_gib_without_overhead"] == p["memory_gib"] - p["memory"]["overhead_gib"]
    # Megatron-LM FLOPs of 2 sequences of 8192: above 6 x (params without the input embedding) per token
    assert llm["flops_per_step"] > 6 * (p["memory"]["params"] - 128256 * 4096) * 2 * 8192
    vit = plan["vit_600m_throughput"]
    assert vit["patches"] == 4096 and vit["training_flops_per_iteration"] > 0
    assert plan["cuda_fp32_vs_cpu"]["tolerance_rel"] == 1e-4 and plan["bf16_vs_fp32"]["tolerance_rel"] == 1e-2
    # no GPU here: TE checks say they would be skipped and why
    assert "CUDA" in plan["te_spec_vs_local"]["skip_reason"]


def test_judging_and_report(tmp_path):
    assert max_rel_diff([1.0, 2.0], [1.0, 2.0002]) == abs(2.0 - 2.0002) / 2.0002
    assert max_rel_diff([1.0], [1.0, 2.0]) == math.inf and max_rel_diff([math.nan], [1.0]) == math.inf
    results = [judged("a", True, "ok", x=1.5), judged("b", False, "off by 2 %"), skipped("c", "no TE"),
               CheckResult("d", FAIL, "group 'x' timed out after 20 s")]
    assert [r.status for r in results] == [PASS, FAIL, SKIPPED, FAIL]
    ctx = CheckContext(out=str(tmp_path), device="cpu")
    report = write_report(ctx, results, environment(), seconds=3.0, argv=["--out", "x"], pending=["e"])
    assert report["summary"] == {PASS: 1, FAIL: 2, SKIPPED: 1}
    stored = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [c["name"] for c in stored["checks"]] == ["a", "b", "c", "d"] and stored["pending"] == ["e"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| b | fail | off by 2 % |" in md and "not reached: e" in md and "- x: 1.5" in md


def _per_sample_sdpa(q, k, v, cu_seqlens, *, backend="sdpa"):
    """An independent packed attention: torch SDPA (causal) sample by sample, GQA by repeating KV."""
    import torch

    rep = q.shape[1] // k.shape[1]
    outs = []
    for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)))
        outs.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1))
    out = torch.cat(outs)
    return out if backend == "sdpa" else out.roll(1, dims=0)  # "shifted": wrong on purpose


def test_packed_attention_check_judges_backends(tmp_path, monkeypatch):
    from megatron_omni.gpu_check import packed_attention as pa

    monkeypatch.setattr(pa, "find_backends", lambda: (_per_sample_sdpa, ["sdpa", "shifted"], ""))
    result = pa._check(CheckContext(out=str(tmp_path), device="cpu"))
    backends = result.numbers["backends"]
    assert backends["sdpa"]["ok"] and max(backends["sdpa"]["rel_err"].values()) < pa.BF16_TOL
    assert not backends["shifted"]["ok"]
    assert result.status == FAIL and "sdpa ok, shifted FAILED" in result.reason


def test_exhausted_budget_skips_groups_and_still_reports(tmp_path):
    from megatron_omni.gpu_check.runner import run_all

    ctx = CheckContext(out=str(tmp_path), device="cpu")
    report = run_all(ctx, ["packed_attention", "dali"], budget_s=0)
    assert [c["status"] for c in report["checks"]] == [SKIPPED, SKIPPED]
    assert "time budget of 0 s used up before group 'dali'" in (tmp_path / "gpu_check.md").read_text()
    assert not (tmp_path / "logs").exists()  # no group process was started
