"""Two CPU processes in a gloo world build the same datasets; only rank 0 tokenizes."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_omni.config.schema import DataConfig, DataSource
from megatron_omni.data import (
    DEMO_TEXT_CORPUS,
    DEMO_TEXT_TOKENIZER,
    DataParallelSampler,
    build_text_datasets,
    build_tokenizer,
    ensure_tokenized,
    text_microbatches,
)

WORLD = 2


def _rank_main(rank: int, workdir: str) -> None:
    """One rank: join the gloo world, tokenize (rank 0 only), build, read one micro-batch."""
    dist.init_process_group(
        "gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=WORLD
    )
    try:
        cfg = DataConfig(blend=[DataSource(path=DEMO_TEXT_CORPUS)], tokenizer_model=DEMO_TEXT_TOKENIZER,
                         seq_length=128, split="98,2,0")
        tokenizer = build_tokenizer(cfg)
        cache = os.path.join(workdir, "cache")
        _, wrote = ensure_tokenized(DEMO_TEXT_CORPUS, "text", tokenizer, cache)
        train, valid, _ = build_text_datasets(cfg, tokenizer, seed=1234, num_samples=(64, 8, 0),
                                              cache_dir=cache)
        sampler = DataParallelSampler(len(train), 0, micro_batch_size=2, dp_rank=rank, dp_size=WORLD)
        batch = next(text_microbatches(train, sampler))
        result = {
            "wrote": wrote,
            "sizes": [len(train), len(valid)],
            "sample0": train[0]["tokens"].tolist(),
            "batch": batch["tokens"].tolist(),
            "expected_batch": [train[i]["tokens"].tolist() for i in (2 * rank, 2 * rank + 1)],
        }
        with open(os.path.join(workdir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_rank_gloo_build(tmp_path):
    mp.spawn(_rank_main, args=(str(tmp_path),), nprocs=WORLD, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))
    assert (r0["wrote"], r1["wrote"]) == (True, False)  # rank 1 waited for rank 0's files
    assert len(list((tmp_path / "cache" / "tokenized").glob("*.bin"))) == 1
    assert r0["sizes"] == r1["sizes"] and r0["sizes"][0] >= 64
    assert r0["sample0"] == r1["sample0"] and len(r0["sample0"]) == 128
    for r in (r0, r1):
        assert r["batch"] == r["expected_batch"]
    assert r0["batch"] != r1["batch"]  # DP ranks read different samples
    assert torch.tensor(r0["batch"]).shape == (2, 128)
