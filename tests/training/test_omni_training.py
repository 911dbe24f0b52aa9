"""The omni model through the training loop (mock packed microbatches of every modality):
TP2 x PP2 with an uneven first stage and recomputed encoders == the single-rank run (losses per
modality and the gradient of every module, fp32), and so are CP2 and TP2 x CP2 (THD `torch` path);
frozen modules get no gradient and no optimizer state; a run resumed from its checkpoint continues
with the same losses."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.launch import metrics, torchrun, train

CONFIG = "configs/tiny/omni_mock.yaml"
SMALL = ["data.seq_length=96", "train.micro_batch_size=1", "train.global_batch_size=5"]  # one microbatch per modality
REL_TOL = 1e-5


def _grads(nproc, path, overrides):
    torchrun(nproc, ["tests/helpers/grad_step.py", str(path), "--config", CONFIG, *SMALL, *overrides])
    return torch.load(path)


def _assert_equal_step(got, ref):
    assert got["loss"] == pytest.approx(ref["loss"], rel=REL_TOL)
    for m, loss in ref["losses"].items():
        assert got["losses"][m] == pytest.approx(loss, rel=REL_TOL), m
    assert got["audio_gen_loss"] == pytest.approx(ref["audio_gen_loss"], rel=REL_TOL)
    assert set(got["grads"]) == set(ref["grads"])
    for name, g_ref in ref["grads"].items():
        g = got["grads"][name]
        assert g.shape == g_ref.shape, name
        scale = max(g_ref.abs().max().item(), 1e-12)
        assert (g - g_ref).abs().max().item() <= REL_TOL * scale, name


@pytest.fixture(scope="module")
def single_rank_reference(tmp_path_factory):
    """The single-rank run with the dense block-diagonal mask: the reference of the parallel runs."""
    out = tmp_path_factory.mktemp("reference")
    return _grads(1, out / "ref.pt", [f"train.output_dir={out}", "model.packed_attention=dense"])


def test_tp2_pp2_matches_single_rank(tmp_path, single_rank_reference):
    """The reference is the single-rank dense block-diagonal mask; TP2 x PP2 runs it with the same
    dense mask and with the THD path (`torch`: per-segment SDPA, no S x S tensor) + sequence parallel."""
    common = [f"train.output_dir={tmp_path}"]
    ref = single_rank_reference
    # encoders + embedding + 1 decoder layer on stage 0, 3 layers on stage 1; the parallel run
    # recomputes the encoders' layers (what the 72B plan launches), which must not change the math
    layout = ["parallel.tp=2", "parallel.pp=2", "parallel.first_stage_num_layers=1",
              "omni.vision.recompute=true", "omni.audio.recompute=true"]
    assert set(ref["losses"]) == {"text", "image", "video", "audio", "audio_gen"}
    for prefix in ("vision.patch_embed", "vision.decoder", "vision.merger", "audio.decoder", "audio.connector",
                   "embedding", "decoder.layers.3", "output_layer"):
        names = [n for n in ref["grads"] if n.startswith(prefix)]
        assert names and any(ref["grads"][n].abs().max() > 0 for n in names), prefix
    for backend, extra in (("dense", []), ("torch", ["parallel.sequence_parallel=true"])):
        got = _grads(4, tmp_path / f"{backend}.pt", common + layout + [f"model.packed_attention={backend}", *extra])
        _assert_equal_step(got, ref)


def test_cp2_matches_single_rank(tmp_path, single_rank_reference):
    """Context parallelism (issue 14): each packed row's segments split over 2 CP ranks by the 2*cp
    chunk rule (video and audio tokens on both ranks: tests/parallel/test_omni_cp.py), the `torch`
    path's all-gather-KV attention, each rank's loss over the tokens it holds, the gradients reduced
    over DP x CP, each rank encoding its share of the media (outputs all-gathered).  Without the
    distributed optimizer every rank holds the whole reduced gradient."""
    got = _grads(2, tmp_path / "cp2.pt", [f"train.output_dir={tmp_path}", "parallel.cp=2",
                                          "model.packed_attention=torch", "parallel.use_distributed_optimizer=false"])
    _assert_equal_step(got, single_rank_reference)


@pytest.mark.slow
def test_tp2_cp2_sequence_parallel_matches_single_rank(tmp_path, single_rank_reference):
    """TP2 x CP2 with sequence parallel: the padded stream splits over CP, then each rank's share
    over TP (segments padded so the stream divides by 2*cp*tp)."""
    got = _grads(4, tmp_path / "tp2cp2.pt", [f"train.output_dir={tmp_path}", "parallel.cp=2", "parallel.tp=2",
                                             "parallel.sequence_parallel=true", "model.packed_attention=torch",
                                             "parallel.use_distributed_optimizer=false"])
    _assert_equal_step(got, single_rank_reference)


@pytest.mark.slow
def test_cp2_with_one_media_item_per_microbatch_matches_single_rank(tmp_path):
    """Rows of 32 tokens hold one image / video / clip each: CP rank 1 encodes nothing and joins the
    media all-gather (and its backward) with an empty output."""
    short = ["data.seq_length=32", "model.packed_attention=torch"]
    ref = _grads(1, tmp_path / "ref.pt", [f"train.output_dir={tmp_path}", *short])
    got = _grads(2, tmp_path / "cp2.pt", [f"train.output_dir={tmp_path}", *short, "parallel.cp=2",
                                          "parallel.use_distributed_optimizer=false"])
    _assert_equal_step(got, ref)


def test_frozen_modules_get_no_gradient_and_no_optimizer_state(tmp_path):
    # paper Table 2, PT stage 1: only the connectors train
    got = _grads(1, tmp_path / "frozen.pt", [f"train.output_dir={tmp_path}",
                                             "omni.freeze=[vision_encoder,audio_encoder,llm]"])
    assert got["grads"] and all(n.startswith(("vision.merger.", "audio.connector.")) for n in got["grads"])
    assert got["optimizer_numel"] == sum(g.numel() for g in got["grads"].values())
    assert all(g.abs().max() > 0 for g in got["grads"].values())


def test_train_and_resume_exactly(tmp_path):
    # accumulation over all modalities with a 25% text share, adaptive balance every step (Sec. 3.2)
    balance = ("balance={mode: accumulation, modalities: [image, video, audio, audio_gen, text], "
               "pure_text_share: 0.25, adaptive: {enabled: true, window: 2}}")
    overrides = [*SMALL, "train.global_batch_size=8", "parallel.pp=2", "train.steps=4", "train.save_interval=2",
                 "optimizer.lr_warmup_steps=1", "train.eval_interval=1", balance]
    full = tmp_path / "full"
    train(2, full, overrides, cache_dir=tmp_path / "cache", config=CONFIG)
    rows = metrics(full)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["skipped_samples"] == 0 and "audio_gen_loss" in rows[0]
    assert rows[0]["encoder_flops"] > 0 and set(rows[0]["tokens_per_s_by_modality"]) == set(rows[0]["losses"])
    marker = "training_complete.json"  # what examples/slurm_train.sbatch requeues on
    assert json.loads((full / marker).read_text()) == {"step": 4, "steps": 4}
    # resumed from the uninterrupted run's step-2 checkpoint, stopped by exit_interval after step 3
    resumed = tmp_path / "resumed"
    train(2, resumed, overrides + [f"train.load={full / 'checkpoints' / 'iter_0000002'}", "train.exit_interval=3"],
          cache_dir=tmp_path / "cache", config=CONFIG)
    again = metrics(resumed)
    assert [r["step"] for r in again] == [3] and not (resumed / marker).exists()  # stopped early: not complete
    assert (resumed / "checkpoints" / "iter_0000003").is_dir()  # exit_interval saves before it exits
    a, b = rows[2], again[0]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-6)
    assert b["adaptive_weights"] == pytest.approx(a["adaptive_weights"], rel=1e-9)  # the balancer state resumed
    # 8 microbatches, 25% text: exactly two text microbatches per update; weights move after H=2 segments
    assert all(set(r["losses"]) >= {"text"} for r in rows)
    assert rows[0]["modality_weights"] == pytest.approx({m: 1.0 for m in rows[0]["modality_weights"]})
    assert rows[-1]["modality_weights"] != pytest.approx(rows[0]["modality_weights"])
    assert rows[-1]["loss"] < rows[0]["loss"]
