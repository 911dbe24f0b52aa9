"""The planner on omni models: encoders on the first stage, trainable modules per stage, the
modality mix from the scheduler, the uneven first stage, encoder recompute, stage chains."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from megatron_omni.balance import ModalityRoundScheduler
from megatron_omni.config import load_config
from megatron_omni.planner.chain import plan_chain
from megatron_omni.planner.cluster import make_cluster
from megatron_omni.planner.jobs import load_job
from megatron_omni.planner.layout import Layout, check_layout
from megatron_omni.planner.memory import trainable_params_per_gpu
from megatron_omni.planner.omni import encoder_params
from megatron_omni.planner.search import evaluate, search
from megatron_omni.config.loader import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGES = ("pt1", "pt2", "pt3", "it1", "it2", "it3", "at")


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)  # stage configs name their blends relative to the repository


def test_encoder_params_equal_the_built_model():
    """Per-module counts equal the summary tool's, which builds the real OmniModel."""
    from megatron_omni.models.summary import parameter_counts

    cfg = load_config("configs/model/m2omni_tiny.yaml")
    built = parameter_counts(cfg)
    planned = encoder_params(cfg.omni)
    for module, counts in planned.items():
        assert counts.tp_split + counts.replicated == built[module], module
    # the ViT's GEMM weights are tensor-parallel, its LayerNorms are not
    assert planned["vision_encoder"].tp_split > 0 and planned["vision_encoder"].replicated > 0


def test_modality_shares_are_the_schedulers():
    job = load_job("configs/m2omni_72b/stages/pt3.yaml")
    shares = job.omni.modality_shares(16)
    scheduler = ModalityRoundScheduler(job.omni.balance, 16, seed=0)
    counts = {m: 0 for m in shares}
    for step in range(40):
        for m, c in scheduler.plan(step).counts().items():
            counts[m] += c
    assert shares == pytest.approx({m: c / (40 * 16) for m, c in counts.items()})
    assert shares["text"] == 0.25  # Sec. 3.3, exact


@pytest.mark.parametrize("stage, expected", [
    # Table 2 trainable modules -> forward-pass equivalents: 3 trains, 2 carries gradients, 1 forward only
    ("pt1", {"llm": 2, "vision_encoder": 1, "vision_connector": 3, "audio_encoder": 1, "audio_connector": 3}),
    ("pt2", {"llm": 2, "vision_encoder": 3, "vision_connector": 3, "audio_encoder": 1, "audio_connector": 1}),
    ("it3", {"llm": 3, "vision_encoder": 1, "vision_connector": 3, "audio_encoder": 1, "audio_connector": 3}),
    ("at", {"llm": 2, "vision_encoder": 1, "vision_connector": 1, "audio_encoder": 1, "audio_connector": 1}),
])
def test_passes_follow_the_trainable_modules(stage, expected):
    w = load_job(f"configs/m2omni_72b/stages/{stage}.yaml", ["omni.vision.recompute=false"]).omni
    assert {m: w.passes(m) for m in expected} == expected


def test_frozen_modules_hold_weights_only():
    """PT-1 trains only the connectors: that is all the optimizer holds on the first stage."""
    job = load_job("configs/m2omni_72b/stages/pt1.yaml")
    layout = Layout(tp=8, pp=2)
    enc = encoder_params(job.omni.omni)
    rank0 = trainable_params_per_gpu(job, layout, 0)
    assert rank0["trainable"] == enc["vision_connector"].per_gpu(8) + enc["audio_connector"].per_gpu(8)
    assert trainable_params_per_gpu(job, layout, 1)["trainable"] == 0
    est = evaluate(job, layout, make_cluster("h100", 128))
    full = evaluate(load_job("configs/m2omni_72b/stages/pt3.yaml"), layout, make_cluster("h100", 128))
    # distributed optimizer: fp32 master + Adam m, v (12 bytes) of the connectors, over DP 8
    assert est.memory.optimizer_gib == pytest.approx(rank0["trainable"] * 12 / 8 / 2**30)
    assert full.memory.optimizer_gib > 20 * est.memory.optimizer_gib
    assert est.time.step_s < full.time.step_s  # no weight gradients in the LLM


def test_encoder_recompute_cuts_first_stage_activations():
    job = load_job("configs/m2omni_72b/stages/pt3.yaml")
    cluster = make_cluster("h100", 128)
    plain = evaluate(job, Layout(tp=8, pp=4, encoder_recompute=False), cluster)
    recomputed = evaluate(job, Layout(tp=8, pp=4, encoder_recompute=True), cluster)
    assert plain.memory.rank == "first"  # the encoders make the first stage the fullest
    assert recomputed.memory.encoder_activations_gib < plain.memory.encoder_activations_gib / 4
    assert recomputed.time.compute_s > plain.time.compute_s  # one more encoder forward
    # frozen encoders (IT-3) keep no activations at all (only the trained connectors do)
    it3 = evaluate(load_job("configs/m2omni_72b/stages/it3.yaml"), Layout(tp=8, pp=4), cluster)
    trained = evaluate(load_job("configs/m2omni_72b/stages/it3.yaml", ["omni.freeze=[]", "omni.vision.recompute=false"]),
                       Layout(tp=8, pp=4), cluster)
    assert it3.memory.encoder_activations_gib < trained.memory.encoder_activations_gib / 10


def test_uneven_first_stage_balances_the_encoders():
    """9B PT-3 on TP1 x PP2: the search gives the encoders' stage fewer layers, and it is faster."""
    job = load_job("configs/m2omni_9b/stages/pt3.yaml")
    cluster = make_cluster("h100", 8)
    best = [e for e in search(job, cluster).feasible if (e.layout.tp, e.layout.pp, e.layout.vpp) == (1, 2, None)][0]
    assert best.layout.first_stage_layers is not None and best.layout.first_stage_layers < 16
    even = evaluate(job, dataclasses.replace(best.layout, first_stage_layers=None), cluster)
    assert best.time.step_s < even.time.step_s


def test_omni_rules_megatron_omni_enforces():
    """The trainer's omni CP rules (config/validate.py): a THD attention path, no pipeline, no DPO rows."""
    job = load_job("configs/m2omni_72b/stages/pt3.yaml")
    check_layout(job, Layout(tp=8, cp=2), 128)  # THD (auto) packed attention, pp=1: runs
    with pytest.raises(ConfigError, match="parallel.pp=2 is not supported for omni runs"):
        check_layout(job, Layout(tp=8, pp=2, cp=2), 128)
    with pytest.raises(ConfigError, match="dense block-diagonal mask has no context parallelism"):
        check_layout(load_job("configs/m2omni_72b/stages/pt3.yaml", ["model.packed_attention=dense"]),
                     Layout(tp=8, cp=2), 128)
    with pytest.raises(ConfigError, match="preference \\(DPO\\) rows"):
        check_layout(load_job("configs/m2omni_72b/stages/at.yaml"), Layout(tp=8, cp=2), 128)
    with pytest.raises(ConfigError, match="balance.mode=accumulation"):  # 4 modalities + text need >= 5
        check_layout(dataclasses.replace(job, global_batch=16), Layout(tp=8), 128)


@pytest.mark.slow  # two full chain searches (~30 s); the chain search itself runs in test_cli_omni_json_and_chain
def test_configured_chain_layouts_fit_every_stage():
    """The 9B / 72B stage configs carry the layout `plan.py --chain` ranks first: it fits every
    stage that takes it (the long-video stages have their own, tests/planner/test_long_video_configs.py)
    and none runs below 90% of its own best layout (planned: 9B 96.9%, 72B 90.6% -- 72B PT-2 alone
    would rather run tp=4, cp=2)."""
    import yaml

    for size, gpus in (("m2omni_9b", 8), ("m2omni_72b", 128)):
        chained = [s for s in STAGES
                   if "parallel" not in yaml.safe_load(open(f"configs/{size}/stages/{s}.yaml"))]
        assert "it3" not in chained and "pt3" in chained
        jobs = {s: load_job(f"configs/{size}/stages/{s}.yaml") for s in chained}
        cfg = load_config(f"configs/{size}/stages/pt3.yaml")
        p = cfg.parallel
        configured = Layout(tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, first_stage_layers=p.first_stage_num_layers,
                            micro_batch=cfg.train.micro_batch_size)  # encoder recompute: as configured
        chain = {c.layout: c for c in plan_chain(jobs, make_cluster("h100", gpus))}
        assert configured in chain, (size, configured.describe())
        best = max(c.worst_ratio for c in chain.values())
        assert chain[configured].worst_ratio == pytest.approx(best, abs=1e-3)  # the chain's #1 (ties: vpp)
        assert chain[configured].worst_ratio >= 0.90


def test_cli_omni_json_and_chain():
    plan = [sys.executable, os.path.join(ROOT, "tools", "plan.py")]
    out = subprocess.run(plan + ["--model", "configs/model/m2omni_72b.yaml", "--gpus", "128", "--global-batch", "512",
                                 "--json", "--top", "3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["omni"]["encoder_params"]["vision_encoder"] > 6e8
    assert report["job"]["params"] == 71_559_954_112  # python -m megatron_omni.models.summary: the built model (incl. 1,120 fixed SAN-M CMVN statistics)
    for d in report["layouts"]:
        assert d["fits"] and d["cp"] == 1 and "parallel.tp=" + str(d["tp"]) in d["overrides"]
        # encoders add FLOPs on top of the LLM's; packed rows' attention (sum L_i^2) is below one S^2 row's
        assert d["flops_per_token"] > d["llm_flops_per_token"]
        assert d["llm_flops_per_token"] < report["flops_per_token"]
    bad = subprocess.run(plan + ["--model", "configs/model/llama3_70b.yaml", "--gpus", "64"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "give --global-batch" in bad.stderr


def test_media_measured_on_the_stage_data(tmp_path):
    """--media-from-data reads the stage's own packed rows: the demo clips last 1, 1.5 or 2 s
    (tools/make_demo_data.py), and the measured shares replace the assumed ones in the plan."""
    from megatron_omni.planner.media_stats import measure_media

    demo = tmp_path / "demo"
    subprocess.run([sys.executable, "tools/make_demo_data.py", "--out", str(demo)], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    media = measure_media(load_config("configs/tiny/stages/pt3.yaml", [f"data.root={demo}"]), microbatches=2)
    assert set(media.media_fraction) == {"image", "video", "audio"}
    assert all(0.0 < f < 1.0 for f in media.media_fraction.values())
    assert 0.9 <= media.audio_seconds <= 2.0  # fbank frames / 100: window edges drop a few frames
    assert media.source.startswith("measured") and str(demo) in media.source
    out = subprocess.run([sys.executable, "tools/plan.py", "--model", "configs/tiny/stages/pt3.yaml", "--gpus", "8",
                          "--json", "--top", "1", "--media-from-data", "--media-fraction", "audio=0.3",
                          f"data.root={demo}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    omni = json.loads(out.stdout)["omni"]
    assert omni["media_source"].startswith("measured") and omni["media_fraction"]["audio"] == 0.3  # the flag wins
    assert 0.0 < omni["media_fraction"]["image"] < 1.0


def test_memory_prices_the_packed_attention_path_the_config_selects():
    """`model.packed_attention=dense` keeps heads x s^2 scores per layer (no dropout);
    the THD paths (te / torch / auto) keep none -- the only difference between the plans."""
    from megatron_omni.planner.memory import MemoryAssumptions, estimate_memory, layer_activation_bytes_per_token

    layout = Layout(tp=8, pp=2, vpp=None, micro_batch=1, first_stage_layers=36)
    per_token, total = {}, {}
    for backend in ("dense", "torch", "te", "auto"):
        job = load_job("configs/m2omni_72b/stages/pt3.yaml", [f"model.packed_attention={backend}"])
        per_token[backend] = layer_activation_bytes_per_token(job.model, job, layout, MemoryAssumptions())
        total[backend] = estimate_memory(job, layout, 128).activations_gib
    assert per_token["torch"] == per_token["te"] == per_token["auto"]
    # 8192 keys: over the fused softmax kernel's 4096, fp32 softmax output + bf16 probabilities (6 bytes)
    assert per_token["dense"] - per_token["torch"] == job.model.num_attention_heads * job.seq_len * 6
    assert total["dense"] > total["torch"]
