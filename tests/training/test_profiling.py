"""Throughput profiling: tools/profile_throughput.py on a real TP2 x PP2 gloo world, the
report/trace/chart files it writes, and that profiling neither changes the numbers nor
adds keys to a default run's metrics rows; the same on the tiny omni run (mock data): tokens/s
per modality, encoder FLOPs in TFLOP/s, the data fetch in the time split.  Plus the pure parts
(summary arithmetic, trace attribution incl. the GPU/NCCL path) on synthetic data."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from megatron_omni.profiling.report import SPLIT, render_markdown, summarize
from megatron_omni.profiling.run import parse_trace_steps
from megatron_omni.profiling.trace import analyze_events
from tests.helpers.launch import TINY, metrics, torchrun, train

STEPS = 4
OMNI_STEPS = 3
MEDIA = ("image", "video", "audio")  # mock modalities with encoder input
NO_ENCODER = ("text", "audio_gen")  # audio_gen: speech codes are LLM outputs, no encoder pass
SECTIONS = ("## Throughput", "## Step time", "## Time split per pipeline stage", "## Pipeline bubble",
            "## Optimizer", "## Communication", "### From megatron timers", "### From the torch.profiler trace",
            "## Charts")


@pytest.fixture(scope="module")
def profiled(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("profile")
    proc = torchrun(4, ["tools/profile_throughput.py", "--config", "configs/tiny/llm.yaml", "--steps", str(STEPS),
                        "--warmup", "1", "--trace-steps", "2:3", "--out", str(out), *TINY,
                        f"data.cache_dir={data_cache}", "parallel.tp=2", "parallel.pp=2"])
    return out, proc


@pytest.fixture(scope="module")
def profiled_omni(tmp_path_factory):
    """The tiny omni run at TP2 x PP2 on mock microbatches of every modality (8 per step)."""
    out = tmp_path_factory.mktemp("profile_omni")
    proc = torchrun(4, ["tools/profile_throughput.py", "--config", "configs/tiny/omni_mock.yaml",
                        "--steps", str(OMNI_STEPS), "--warmup", "1", "--trace-steps", "2:2", "--out", str(out),
                        "parallel.tp=2", "parallel.pp=2", "train.micro_batch_size=1", "train.global_batch_size=8"])
    return out, proc


def test_report_sections_and_throughput(profiled):
    out, proc = profiled
    report = (out / "report.md").read_text()
    for section in SECTIONS:
        assert section in report, section
    for needle in ("tokens/s", "TFLOP/s/GPU", "MFU", "n/a on CPU", "(p-1)/(v*m)", "time_split.png", "step_time.png"):
        assert needle in report, needle
    s = json.loads((out / "profile.json").read_text())
    assert s["throughput"]["tokens_per_s"] > 0 and s["throughput"]["tflops_per_gpu"] > 0
    assert s["throughput"]["mfu"] is None  # CPU: no peak
    assert s["measured_steps"] == [4]  # warmup 1, steps 2-3 traced
    st = s["step_time_ms"]
    assert 0 < st["min"] <= st["p50"] <= st["max"]
    assert "profile:" in proc.stdout and "TFLOP/s/GPU" in proc.stdout


def test_time_split_per_stage(profiled):
    out, _ = profiled
    s = json.loads((out / "profile.json").read_text())
    assert [x["pp"] for x in s["stages"]] == [0, 1]
    for stage in s["stages"]:
        split = stage["split"]
        assert all(split[k] >= 0 for k, _ in SPLIT), split
        # Both stages read data (tokens on the first, labels on the last); all compute.
        for key in ("data_wait", "forward", "backward", "optimizer", "step"):
            assert split[key] > 0, (stage["pp"], key, split)
        assert split["p2p_timers"] > 0  # PP2: the p2p timers ran
        compute = split["data_wait"] + split["forward"] + split["backward"]
        assert compute <= split["step"], split
        assert sum(split[k] for k, _ in SPLIT) == pytest.approx(split["step"], rel=0.05)
    b = s["bubble"]
    assert b["analytic_fraction"] == pytest.approx(1 / 4)  # (p-1)/(v*m) = 1/(1*4)
    assert b["measured_ms"] >= 0 and b["busiest_compute_ms"] > 0
    assert s["comm_timers"]["dp_grad_sync_ms"] > 0


def test_traces_and_comm_attribution(profiled):
    out, _ = profiled
    s = json.loads((out / "profile.json").read_text())
    rows = {r["rank"]: r for r in s["comm_trace"]}
    assert sorted(rows) == [0, 1, 2, 3]
    for rank in range(4):
        data = json.loads((out / f"trace_rank{rank}.json").read_text())
        names = {e.get("name") for e in data["traceEvents"]}
        assert len(data["traceEvents"]) > 100
        assert {"forward-compute", "backward-compute", "optimizer"} <= names  # timers are trace ranges
        assert any(str(n).startswith("gloo:") for n in names)
        comm = rows[rank]["comm_ms"]
        assert comm["tp"] > 0 and comm["pp"] > 0, comm  # TP all-reduces in compute, PP send/recv


def test_charts_are_real_images(profiled):
    out, _ = profiled
    for name in ("time_split.png", "step_time.png"):
        path = out / name
        assert path.stat().st_size > 5000
        with Image.open(path) as img:
            img.load()
            assert img.size[0] >= 600 and img.size[1] >= 300
            assert len(img.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 10  # not blank


def test_metrics_rows_carry_timers_and_default_rows_do_not(profiled, tmp_path, data_cache):
    out, _ = profiled
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        t = r["timers"]
        assert t["forward-compute"] > 0 and t["backward-compute"] > 0 and t["optimizer"] > 0
        assert t["train-step"] > 0 and {"tokens_per_s", "tflops_per_gpu", "mfu"} <= set(r)
    assert not (out / "checkpoints").exists()  # profiling runs do not checkpoint
    # A default run (no profiler) writes the same numbers, without a `timers` key.
    train(1, tmp_path, [f"train.steps={STEPS}", "train.save_interval=null"], cache_dir=data_cache)
    plain = metrics(tmp_path)
    assert all("timers" not in r for r in plain)
    for a, b in zip(plain, rows):
        assert set(a) == set(b) - {"timers"}
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)  # profiling changes nothing


def test_omni_per_modality_throughput(profiled_omni):
    out, proc = profiled_omni
    for name in ("report.md", "profile.json", "time_split.png", "step_time.png", "metrics.jsonl",
                 *(f"trace_rank{r}.json" for r in range(4))):
        assert (out / name).stat().st_size > 0, name
    s = json.loads((out / "profile.json").read_text())
    thr, mods = s["throughput"], {r["modality"]: r for r in s["modalities"]}
    assert set(mods) == set(MEDIA + NO_ENCODER)
    assert all(r["tokens_per_s"] > 0 for r in mods.values())
    assert sum(r["tokens_per_s"] for r in mods.values()) == pytest.approx(thr["tokens_per_s"], rel=1e-6)
    assert sum(r["token_share"] for r in mods.values()) == pytest.approx(1.0)
    for m in MEDIA:
        assert mods[m]["encoder_flops_per_step"] > 0 and 0 < mods[m]["encoder_share"] < 1, mods[m]
    for m in NO_ENCODER:
        assert mods[m]["encoder_flops_per_step"] == 0 and mods[m]["encoder_share"] == 0, mods[m]
    assert sum(r["flops_share"] for r in mods.values()) == pytest.approx(1.0)
    # TFLOP/s/GPU counts the encoders: LLM + encoder FLOPs of the measured step, as its metrics row does.
    assert thr["flops_per_step"] == pytest.approx(thr["llm_flops_per_step"] + thr["encoder_flops_per_step"])
    assert thr["encoder_flops_per_step"] == pytest.approx(sum(r["encoder_flops_per_step"] for r in mods.values()))
    assert 0 < thr["encoder_flops_share"] < 1 and thr["tflops_per_gpu"] > thr["llm_tflops_per_gpu"] > 0
    rows = {r["step"]: r for r in metrics(out)}
    assert s["measured_steps"] == [3]
    row = rows[3]
    assert thr["tflops_per_gpu"] == pytest.approx(row["tflops_per_gpu"], rel=1e-6)
    assert thr["encoder_flops_per_step"] == pytest.approx(row["encoder_flops"])
    # The LLM's FLOPs are those of the step's packed rows (attention inside each sample), below the
    # unpacked S^2-per-row count and above its attention-free part.
    from megatron_omni.config import load_config
    from megatron_omni.training import flops

    cfg = load_config(str(out / "config.yaml"))
    rows_per_step = cfg.train.global_batch_size
    unpacked = flops.llm_flops_per_step(cfg.model, rows_per_step, cfg.data.seq_length, tp=cfg.parallel.tp)
    one_token_samples = rows_per_step * flops.llm_flops(cfg.model, [1] * cfg.data.seq_length, tp=cfg.parallel.tp)
    assert thr["llm_flops_per_step"] == pytest.approx(row["llm_flops"])
    assert one_token_samples < row["llm_flops"] < unpacked
    assert row["encoder_flops_by_modality"] == pytest.approx({m: mods[m]["encoder_flops_per_step"] for m in mods})
    assert thr["mfu"] is None  # CPU: no peak
    report = (out / "report.md").read_text()
    assert "### Per modality" in report and "encoders are" in report and "LLM +" in report
    for m in mods:
        assert f"| {m} |" in report, m
    assert "profile per modality" in proc.stdout


def test_omni_time_split(profiled_omni):
    out, _ = profiled_omni
    s = json.loads((out / "profile.json").read_text())
    assert [x["pp"] for x in s["stages"]] == [0, 1]
    for stage in s["stages"]:
        split, timers = stage["split"], stage["timers"]
        # The omni step draws its microbatches before the schedule: timed as data-fetch on every rank.
        assert timers["data-fetch"] > 0 and split["data_wait"] >= timers["data-fetch"]
        for key in ("forward", "backward", "pipeline", "optimizer", "step"):
            assert split[key] > 0, (stage["pp"], key, split)
        assert sum(split[k] for k, _ in SPLIT) == pytest.approx(split["step"], rel=0.05)
    assert s["bubble"]["analytic_fraction"] == pytest.approx(1 / 8)  # (p-1)/(v*m), 8 microbatches
    comm = {r["rank"]: r["comm_ms"] for r in s["comm_trace"]}
    assert sorted(comm) == [0, 1, 2, 3] and all(c["tp"] > 0 and c["pp"] > 0 for c in comm.values())


# ---------------------------------------------------------------- pure parts


def _record(step, per_rank, traced=False):
    return {"step": step, "step_time_s": per_rank[0]["train-step"] / 1e3, "tokens_per_s": 1.0,
            "tflops_per_gpu": 1.0, "mfu": None, "traced": traced, "ranks": per_rank}


def test_summary_arithmetic():
    stage0 = {"train-step": 100.0, "forward-backward": 80.0, "forward-compute": 30.0, "data-wait": 5.0,
              "backward-compute": 35.0, "all-grads-sync": 4.0, "optimizer": 15.0, "forward-send": 2.0}
    stage1 = {**stage0, "forward-compute": 40.0, "backward-compute": 30.0, "forward-send": 0.0}
    meta = dict(world=2, tp=1, pp=2, vpp=None, cp=1, dp=1, num_microbatches=4, micro_batch_size=1,
                global_batch_size=4, seq_length=10, flops_per_step=1e12, device="h100", precision="bf16",
                timing_log_level=2)
    info = [{"rank": 0, "pp": 0, "tp": 0, "dp": 0}, {"rank": 1, "pp": 1, "tp": 0, "dp": 0}]
    slow = {k: 2 * v for k, v in stage0.items()}
    records = [_record(1, [slow, slow]), _record(2, [stage0, stage1]), _record(3, [stage0, stage1], traced=True)]
    s = summarize(meta, records, info, [], warmup=1, trace_steps=(3, 3))
    assert s["measured_steps"] == [2]
    assert s["throughput"]["tokens_per_s"] == pytest.approx(40 / 0.1)
    assert s["throughput"]["tflops_per_gpu"] == pytest.approx(1e12 / 0.1 / 2 / 1e12)
    assert s["throughput"]["mfu"] == pytest.approx(5.0 / 989.0)
    sp0 = s["stages"][0]["split"]
    assert (sp0["data_wait"], sp0["forward"], sp0["backward"], sp0["grad_sync"]) == (5.0, 25.0, 35.0, 4.0)
    assert sp0["pipeline"] == pytest.approx(80 - 5 - 25 - 35 - 4)
    assert sp0["other"] == pytest.approx(100 - 80 - 15)
    assert sum(sp0[k] for k, _ in SPLIT) == pytest.approx(100.0)
    b = s["bubble"]
    assert b["busiest_stage"] == 1 and b["busiest_compute_ms"] == pytest.approx(70.0)
    assert b["measured_ms"] == pytest.approx(80 - 70 - 4)
    assert b["analytic_fraction"] == pytest.approx(1 / 4) and b["analytic_ms"] == pytest.approx(70 / 4)


def test_summary_omni_modalities_and_data_fetch():
    timers = {"train-step": 100.0, "data-fetch": 10.0, "forward-backward": 70.0, "forward-compute": 30.0,
              "data-wait": 1.0, "backward-compute": 30.0, "optimizer": 12.0}
    meta = dict(world=1, tp=1, pp=1, vpp=None, cp=1, dp=1, num_microbatches=4, micro_batch_size=1,
                global_batch_size=4, seq_length=10, flops_per_step=8e9, device="cpu", precision="fp32",
                timing_log_level=2)
    records = []
    for step, (t, by_mod, enc) in enumerate([
        (0.1, {"text": 30, "image": 10}, {"text": 0.0, "image": 1e9}),  # 4 x 10 tokens: 3 text, 1 image
        (0.3, {"text": 20, "image": 20}, {"text": 0.0, "image": 3e9}),
    ], start=1):
        records.append({**_record(step, [dict(timers, **{"train-step": 1e3 * t})]), "step_time_s": t,
                        "tokens_per_s_by_modality": {m: n / t for m, n in by_mod.items()},
                        "encoder_flops": sum(enc.values()), "encoder_flops_by_modality": enc})
    info = [{"rank": 0, "pp": 0, "tp": 0, "dp": 0}]
    s = summarize(meta, records, info, [], warmup=0, trace_steps=None)
    thr, mods = s["throughput"], {r["modality"]: r for r in s["modalities"]}
    assert thr["tokens_per_s"] == pytest.approx(80 / 0.4)
    assert mods["text"]["tokens_per_s"] == pytest.approx(50 / 0.4)
    assert mods["image"]["tokens_per_s"] == pytest.approx(30 / 0.4)
    assert thr["encoder_flops_per_step"] == pytest.approx(2e9) and thr["flops_per_step"] == pytest.approx(10e9)
    assert thr["tflops_per_gpu"] == pytest.approx(10e9 / 0.2 / 1e12)  # mean FLOPs / mean step time
    assert thr["encoder_flops_share"] == pytest.approx(0.2)
    # image: 3/8 of the tokens -> 3e9 LLM FLOPs + 2e9 encoder FLOPs per step (mean)
    assert mods["image"]["llm_flops_per_step"] == pytest.approx(3e9)
    assert mods["image"]["encoder_share"] == pytest.approx(2 / 5) and mods["image"]["flops_share"] == pytest.approx(0.5)
    assert mods["text"]["encoder_share"] == 0 and mods["text"]["flops_share"] == pytest.approx(0.5)
    sp = s["stages"][0]["split"]
    assert sp["data_wait"] == pytest.approx(11.0) and sp["forward"] == pytest.approx(29.0)
    assert sp["pipeline"] == pytest.approx(70 - 1 - 29 - 30)
    assert sp["other"] == pytest.approx(200 - 70 - 12 - 10)  # mean step 200 ms; the fetch is outside the schedule
    assert "### Per modality" in render_markdown(s)
    # A text-only run has no per-modality table.
    plain = summarize(meta, [_record(1, [timers])], info, [], warmup=0, trace_steps=None)
    assert plain["modalities"] is None and plain["throughput"]["encoder_flops_per_step"] == 0
    assert "### Per modality" not in render_markdown(plain)


def _x(name, ts, dur, cat="user_annotation", **args):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "cat": cat, "args": args}


def test_trace_attribution_cpu_and_gpu():
    cpu = [
        _x("forward-compute", 0, 100), _x("gloo:all_reduce", 10, 5),  # TP
        _x("forward-send-backward-recv", 100, 20), _x("gloo:send", 101, 18), _x("gloo:recv", 101, 18),  # PP
        _x("forward-backward", 0, 300), _x("all-grads-sync", 200, 30), _x("gloo:reduce_scatter", 205, 20),  # DP
        _x("gloo:barrier", 250, 3), _x("gloo:broadcast", 290, 2),  # barrier, other
    ]
    r = analyze_events(cpu, num_steps=2)
    ms = r["comm_ms_per_step"]
    assert ms["tp"] == pytest.approx(0.0025) and ms["pp"] == pytest.approx(0.009)
    assert ms["dp"] == pytest.approx(0.010) and ms["barrier"] == pytest.approx(0.0015)
    assert ms["other"] == pytest.approx(0.001) and r["source"] == "cpu collective ops"
    assert r["comm_sum_ms_per_step"]["pp"] == pytest.approx(0.018)  # the overlapping pair counts twice in the sum
    assert r["comm_busy_ms_per_step"] == pytest.approx((5 + 18 + 20 + 2) / 1e3 / 2)
    # Inside a train-step range only: what ran outside (eval, checkpointing) is left out.
    framed = analyze_events([_x("train-step", 0, 300), *cpu, _x("gloo:all_reduce", 400, 50)], num_steps=2)
    assert framed["comm_ms_per_step"] == r["comm_ms_per_step"]
    gpu = [
        _x("backward-compute", 0, 100), _x("cudaLaunchKernel", 50, 1, cat="cuda_runtime", correlation=7),
        _x("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", 400, 40, cat="kernel",
           correlation=7),
        _x("all-grads-sync", 200, 50), _x("cudaLaunchKernel", 210, 1, cat="cuda_runtime", correlation=9),
        _x("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL(x)", 500, 60, cat="kernel", correlation=9),
        _x("nccl:all_reduce", 50, 1),  # CPU-side enqueue: ignored when GPU kernels exist
    ]
    r = analyze_events(gpu)
    assert r["source"] == "gpu nccl kernels"
    assert r["comm_ms_per_step"]["tp"] == pytest.approx(0.040) and r["comm_ms_per_step"]["dp"] == pytest.approx(0.060)
    assert set(r["ops_per_step"]) == {"ncclDevKernel_AllReduce_Sum_bf16_RING_LL",
                                      "ncclDevKernel_ReduceScatter_Sum_f32_RING_LL"}


def test_parse_trace_steps():
    assert parse_trace_steps(None, 10, 2) == (3, 4)
    assert parse_trace_steps(None, 3, 2) == (3, 3)
    assert parse_trace_steps("5:7", 10, 2) == (5, 7)
    assert parse_trace_steps("4", 10, 2) == (4, 4)
    assert parse_trace_steps("none", 10, 2) is None
    with pytest.raises(ValueError):
        parse_trace_steps("8:12", 10, 2)
