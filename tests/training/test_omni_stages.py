"""The omni training loop on the demo data set (tools/make_demo_data.py) through the real loader:
PT-3 at TP2 x PP2 with a corrupt image in the data (skipped and counted, never a crash), exact
resume of the loader position, and the stage chain PT-1 -> PT-2 (weights carried over)."""

from __future__ import annotations

import subprocess

import pytest

from tests.helpers.launch import metrics, train

CONFIG = "configs/tiny/pt_stage3.yaml"
RUN = ["data.seq_length=256", "train.micro_batch_size=1", "train.global_batch_size=8", "optimizer.lr_warmup_steps=1"]


@pytest.fixture(scope="module")
def demo(demo_data):
    return demo_data


def _run(nproc, out, overrides, demo, config=CONFIG, **kw):
    return train(nproc, out, [*RUN, f"data.root={demo}", f"train.load={out / 'checkpoints'}", *overrides],
                 cache_dir=out / "cache", config=config, **kw)


def test_pt3_tp2_pp2_skips_corrupt_media(demo, tmp_path):
    data = tmp_path / "demo"
    subprocess.run(["cp", "-r", str(demo), str(data)], check=True)
    victims = sorted((data / "images").glob("caption_*.jpg"))[3:12:4]  # three of 24 (held-out or not)
    for victim in victims:
        victim.write_bytes(victim.read_bytes()[:200])  # a truncated download
    out = tmp_path / "run"
    proc = _run(4, out, ["parallel.tp=2", "parallel.pp=2", "train.steps=3", "train.eval_interval=3"], data)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert set(rows[-1]["losses"]) == {"image", "video", "audio", "text"}
    assert set(rows[-1]["val_losses"]) == {"image", "video", "audio", "text"}
    assert all(r["encoder_flops"] > 0 for r in rows)
    skipped = rows[-1]["skipped_samples"]
    assert skipped >= 1, "the truncated image must be skipped and counted"
    assert any(v.name in proc.stdout + proc.stderr for v in victims), "a skipped file is named in the log"


def test_resume_continues_the_same_microbatches(demo, tmp_path):
    """A run resumed from the step-2 checkpoint of an uninterrupted 4-step run (its loader position:
    epoch, cursor and the packing buffer's samples) trains steps 3-4 on the same microbatches.  The
    uninterrupted run paused its prefetch threads for that save: pausing must not change its steps
    either (exit_interval and the completion marker: tests/training/test_omni_training.py)."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = ["train.steps=4", "train.save_interval=2", "train.eval_interval=null"]
    _run(1, full, common, demo)
    _run(1, resumed, common + [f"train.load={full / 'checkpoints' / 'iter_0000002'}"], demo)
    a, b = metrics(full), metrics(resumed)
    assert [r["step"] for r in b] == [3, 4]
    for x, y in zip(a[2:], b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6) and y["losses"] == pytest.approx(x["losses"], rel=1e-6)
        assert y["tokens"] == x["tokens"]


SHORT = ["train.steps=2", "train.save_interval=2", "train.eval_interval=null"]


@pytest.fixture(scope="module")
def pt1(demo, tmp_path_factory):
    """Two PT-1 steps (connectors only) on the demo data: the checkpoint the later stages start from."""
    out = tmp_path_factory.mktemp("pt1")
    _run(1, out, SHORT, demo, config="configs/tiny/stages/pt1.yaml")
    return out


def test_stage_chain_pt1_to_pt2(demo, pt1, tmp_path):
    pt2 = tmp_path / "pt2"
    proc = _run(1, pt2, SHORT + [f"train.pretrained_checkpoint={pt1 / 'checkpoints'}"], demo,
                config="configs/tiny/stages/pt2.yaml")
    assert "weights only" in proc.stdout, proc.stdout[-3000:]
    rows = metrics(pt2)
    assert set(rows[0]["losses"]) == {"image"}  # PT-2: image-text data; no pure text while the LLM is frozen
    first = metrics(pt1)
    assert set(first[0]["losses"]) == {"image", "audio"}  # PT-1: image + audio


def test_llm_only_checkpoint_into_an_omni_run_is_a_clear_error(four_checkpoints, tmp_path):
    """A text Llama checkpoint (what hf-to-mcore writes) has no encoders and a smaller vocabulary:
    the omni run refuses it up front, naming what is missing and what to do."""
    llm = four_checkpoints  # the tiny text Llama of configs/tiny/llm.yaml
    proc = train(1, tmp_path / "omni", ["train.steps=1", f"train.pretrained_checkpoint={llm / 'checkpoints'}",
                                        "data.seq_length=96", "train.micro_batch_size=1", "train.global_batch_size=5"],
                 cache_dir=tmp_path / "cache", config="configs/tiny/omni_mock.yaml", check=False)
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "checkpoint does not match the model" in err and "vision." in err, err[-3000:]
    assert "language-model-only checkpoint" in err and "embedding.word_embeddings.weight (" in err


def test_alignment_tuning_dpo_with_lora_from_a_checkpoint(demo, pt1, tmp_path):
    """AT (Eq. 2) at PP2: LoRA adapters added to a checkpoint that has none (B = 0, so the policy
    starts equal to the reference: the first DPO loss is exactly ln 2 through the pipelined
    reference pass), only adapters train, instruction losses carry lambda = 0.3."""
    import math

    at = tmp_path / "at"
    proc = _run(2, at, ["parallel.pp=2", "train.steps=2", "train.eval_interval=null", "data.seq_length=512",
                        f"train.pretrained_checkpoint={pt1 / 'checkpoints'}"], demo,
                config="configs/tiny/stages/at.yaml")
    assert "weights only" in proc.stdout and "LoRA: rank" in proc.stdout
    rows = metrics(at)
    assert rows[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[1]["dpo_loss"] != pytest.approx(math.log(2), abs=1e-9)  # the adapters moved
    weights = rows[0]["modality_weights"]
    assert weights.pop("preference") == 1.0 and all(w == pytest.approx(0.3) for w in weights.values())
    _lora_export_equals_megatron_with_adapters(at, tmp_path)


def _lora_export_equals_megatron_with_adapters(at, tmp_path):
    """mcore-to-hf of the AT run folds (alpha/r) B A into the base weights: the transformers folder's logits
    on a mixed image + video + audio + text sample are megatron's with the adapters on (not off)."""
    import torch
    import transformers

    from megatron_omni.config import ParallelConfig
    from megatron_omni.config.loader import load_config
    from megatron_omni.convert import mcore_to_hf
    from megatron_omni.convert.mcore_io import megatron_world
    from megatron_omni.models.lora import adapters_disabled
    from megatron_omni.models.omni import build_omni_chunks
    from megatron_omni.training.checkpoint import load_checkpoint
    from megatron_omni.training.loop import apply_lora_from_config
    from megatron_omni.training.setup import TrainState
    from tests.convert.omni_export_helpers import hf_inputs, megatron_logits, mixed_sample

    cfg = load_config(str(at / "config.yaml"))
    sample = mixed_sample(cfg.model, cfg.omni)
    with megatron_world():
        chunks = build_omni_chunks(cfg.model, ParallelConfig(), cfg.omni, seq_length=sample["input_ids"].shape[1],
                                   params_dtype=torch.float32)
        apply_lora_from_config(chunks, cfg)
        load_checkpoint(TrainState(model=chunks, optimizer=None, scheduler=None), str(at / "checkpoints"),
                        finetune=True)
        model = chunks[0].eval()
        ref = megatron_logits(model, sample)
        with adapters_disabled(chunks):
            base = megatron_logits(model, sample)
    report = mcore_to_hf(str(at / "checkpoints"), str(tmp_path / "hf"))
    assert any("merged" in n and "LoRA" in n for n in report["notes"]), report["notes"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True,
                                                            dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(**hf_inputs(sample)).logits
    delta, lora_effect = (got - ref).abs().max().item(), (ref - base).abs().max().item()
    print(f"\nAT (LoRA) export vs megatron with adapters: max|d| {delta:.2e}; the adapters move the logits by "
          f"{lora_effect:.2e}")
    assert delta <= 1e-4 and lora_effect > 1e-3
