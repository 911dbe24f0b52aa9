"""5 % of the demo data set's media files broken (truncated images, videos and audio, one emptied
file): a two-rank run trains all its steps, skips each broken sample once per rank and lists it
in bad_samples.jsonl, never a crash."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers.launch import metrics, train
from tests.training.conftest import one_rank_world  # noqa: F401  (fixture)

MEDIA = ("*.jpg", "*.png", "*.mp4", "*.webm", "*.opus", "*.wav")


@pytest.fixture(scope="module")
def broken_demo(demo_data, tmp_path_factory):
    """The demo data set with 5 % of its media files broken; returns (folder, broken files)."""
    data = tmp_path_factory.mktemp("broken") / "demo"
    shutil.copytree(demo_data, data)
    files = sorted(p for pattern in MEDIA for p in data.rglob(pattern))
    victims = files[::20]  # 5 %, spread over the kinds (sorted by folder)
    assert len(victims) >= 4 and len({v.suffix for v in victims}) >= 3
    for victim in victims[1:]:
        victim.write_bytes(victim.read_bytes()[: max(64, victim.stat().st_size // 3)])  # a cut-off download
    victims[0].write_bytes(b"")
    return data, victims


def test_two_ranks_train_through_five_percent_broken_media(broken_demo, tmp_path):
    data, victims = broken_demo
    out = tmp_path / "run"
    train(2, out, ["data.seq_length=256", "train.micro_batch_size=1", "train.global_batch_size=8",
                   "train.steps=5", f"data.root={data}", "train.load=null"],
          cache_dir=out / "cache", config="configs/tiny/pt_stage3.yaml")
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 6))
    assert rows[-1]["skipped_samples"] >= 1
    bad = [json.loads(line) for line in (out / "bad_samples.jsonl").read_text().splitlines()]
    assert bad, "the broken samples are listed"
    names = {v.name for v in victims}
    assert all(any(n in json.dumps(row) for n in names) for row in bad), bad
    keys = [(row["dp_rank"], row["modality"], row["source"], row.get("index")) for row in bad]
    assert len(keys) == len(set(keys)), "each broken sample is listed once per rank"
    # per modality: occurrences and distinct samples (summed over DP ranks, as the file lists them)
    last = rows[-1]
    assert sum(last["skipped_samples_by_modality"].values()) == last["skipped_samples"]
    assert last["bad_samples_by_modality"] == {m: sum(row["modality"] == m for row in bad)
                                               for m in last["bad_samples_by_modality"]}
    assert all(last["skipped_samples_by_modality"][m] >= n for m, n in last["bad_samples_by_modality"].items())


def test_the_bad_sample_tolerance_is_the_run_configs(broken_demo, one_rank_world, tmp_path):  # noqa: F811
    """data.max_bad_fraction / data.bad_window reach the run's loader (built as the training loop
    builds it): no tolerance stops at the first bad sample with the keys named (the message used to
    point at a setting no config could change)."""
    from megatron_omni.config import load_config
    from megatron_omni.data.modality_stream import TooManyBadSamples
    from megatron_omni.models.omni import omni_vocab
    from megatron_omni.parallel.initialize import initialize_distributed
    from megatron_omni.training.omni_data import build_blend_loader

    data, _ = broken_demo
    cfg = load_config("configs/tiny/pt_stage3.yaml", [f"data.root={data}", "data.seq_length=256",
                                                      "data.max_bad_fraction=0.0", "data.bad_window=1",
                                                      f"train.output_dir={tmp_path}"])
    initialize_distributed(cfg.parallel)
    loader, _ = build_blend_loader(cfg, omni_vocab(cfg.model, cfg.omni), dp_rank=0)
    with loader, pytest.raises(TooManyBadSamples) as err:
        for _ in range(100):
            for modality in loader.modalities:
                loader.next_microbatch(modality)
    assert "raise data.max_bad_fraction=0.0 (over data.bad_window=1 samples)" in str(err.value)
