"""build_text_datasets: megatron GPTDatasets from a JSONL corpus, with consistent samples."""

from __future__ import annotations

import numpy
import pytest
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_omni.data import build_text_datasets, ensure_tokenized


def _in_corpus(prefix, sample, eod):
    """True if every EOD-separated piece of `sample` occurs contiguously in one document."""
    dataset = IndexedDataset(prefix)  # keep alive: items are views of its mmap
    docs = [dataset[i].tolist() for i in range(len(dataset))]
    pieces, piece = [], []
    for token in sample:
        piece.append(token)
        if token == eod:
            pieces.append(piece)
            piece = []
    pieces.append(piece)

    def occurs(piece):
        n = len(piece)
        return any(doc[j : j + n] == piece for doc in docs for j in range(len(doc) - n + 1))

    return all(occurs(p) for p in pieces if p)


def test_samples_are_shifted_windows_of_the_corpus(tmp_path, small_corpus, sp_tokenizer, data_config):
    cfg = data_config(small_corpus, seq_length=64, split="90,10,0")
    train, valid, test = build_text_datasets(
        cfg, sp_tokenizer, seed=7, num_samples=(300, 20, 0), cache_dir=str(tmp_path / "cache")
    )
    assert test is None and len(train) >= 300 and len(valid) >= 20
    prefix, wrote = ensure_tokenized(str(small_corpus), "text", sp_tokenizer, str(tmp_path / "cache"))
    assert not wrote  # tokenized once, on first use, then served from the cache
    for i in (0, 1, 299):
        s = train[i]
        assert set(s) == {"tokens", "labels", "loss_mask", "position_ids"}  # no attention_mask
        assert s["tokens"].shape == s["labels"].shape == (64,)
        assert torch.equal(s["labels"][:-1], s["tokens"][1:])  # labels = tokens shifted by one
        assert torch.equal(s["position_ids"], torch.arange(64))
        assert torch.equal(s["loss_mask"], torch.ones(64))
        assert _in_corpus(prefix, torch.cat([s["tokens"], s["labels"][-1:]]).tolist(), sp_tokenizer.eod)


def test_same_seed_same_samples_other_seed_other_order(tmp_path, small_corpus, sp_tokenizer, data_config):
    cfg = data_config(small_corpus, split="100,0,0")
    build = lambda seed, cache: build_text_datasets(
        cfg, sp_tokenizer, seed=seed, num_samples=(50, 0, 0), cache_dir=str(tmp_path / cache))[0]
    a, b, c = build(1, "a"), build(1, "b"), build(2, "a")
    first = [a[i]["tokens"] for i in range(10)]
    assert all(torch.equal(x, b[i]["tokens"]) for i, x in enumerate(first))
    assert not all(torch.equal(x, c[i]["tokens"]) for i, x in enumerate(first))


def test_eod_masking_and_position_reset(tmp_path, small_corpus, sp_tokenizer, data_config):
    cfg = data_config(small_corpus, seq_length=256, split="100,0,0", eod_mask_loss=True,
                      reset_position_ids=True)
    train = build_text_datasets(cfg, sp_tokenizer, seed=3, num_samples=(20, 0, 0),
                                cache_dir=str(tmp_path / "cache"))[0]
    eod = sp_tokenizer.eod
    samples = [train[i] for i in range(20)]
    s = next(x for x in samples if (x["tokens"] == eod).any())  # 256 tokens span documents
    assert torch.equal(s["loss_mask"] == 0, s["tokens"] == eod)
    first_eod = int((s["tokens"] == eod).nonzero()[0])
    assert s["position_ids"][first_eod + 1] == 0 and s["position_ids"][first_eod] == first_eod


def test_weighted_blend_of_jsonl_and_prefix(tmp_path, small_corpus, sp_tokenizer, data_config,
                                            demo_docs, write_jsonl):
    other = write_jsonl(tmp_path / "other.jsonl", demo_docs[200:300])
    prefix, _ = ensure_tokenized(str(other), "text", sp_tokenizer, str(tmp_path / "pre"))
    cfg = data_config(small_corpus, prefix + ".idx", split="100,0,0")  # .idx suffix tolerated
    cfg.blend[0].weight, cfg.blend[1].weight = 3.0, 1.0
    train = build_text_datasets(cfg, sp_tokenizer, seed=1, num_samples=(400, 0, 0),
                                cache_dir=str(tmp_path / "cache"))[0]
    assert isinstance(train, BlendedDataset) and len(train) >= 400
    share = numpy.bincount(train.dataset_index[:400], minlength=2) / 400
    assert abs(share[0] - 0.75) < 0.02


def test_split_without_documents_is_a_clear_error(tmp_path, sp_tokenizer, data_config, demo_docs,
                                                  write_jsonl):
    tiny = write_jsonl(tmp_path / "tiny.jsonl", demo_docs[:10])
    cfg = data_config(tiny, split="98,2,0")
    with pytest.raises(ValueError, match=r"leaves the valid split of .*tiny-\w+ \(10 documents\)"):
        build_text_datasets(cfg, sp_tokenizer, seed=1, num_samples=(10, 1, 0),
                            cache_dir=str(tmp_path / "cache"))
