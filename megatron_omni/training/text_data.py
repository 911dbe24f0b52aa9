"""Text pretraining data for the loop: datasets, and one microbatch iterator per model chunk that reads data."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

from megatron.core import parallel_state

from megatron_omni.config.loader import ConfigError
from megatron_omni.config.schema import RunConfig
from megatron_omni.data import DataParallelSampler, build_text_datasets, build_tokenizer, text_microbatches
from megatron_omni.data.text import describe_text_sample


@dataclass
class TextData:
    train: object  # megatron GPTDataset / BlendedDataset
    valid: Optional[object]

    def train_iterators(self, cfg: RunConfig, num_chunks: int, consumed_samples: int) -> List[Optional[Iterator]]:
        return chunk_iterators(cfg, self.train, num_chunks, consumed_samples)

    def step_samples(self, cfg: RunConfig, consumed_samples: int, num_microbatches: int) -> List[Tuple[str, List[str]]]:
        """("text", sample ids) of each of this DP rank's microbatches of the step that started at
        `consumed_samples`: the sampler's order is a function of it, so nothing is kept per step."""
        sampler = DataParallelSampler(len(self.train), consumed_samples, cfg.train.micro_batch_size,
                                      parallel_state.get_data_parallel_rank(),
                                      parallel_state.get_data_parallel_world_size())
        return [("text", [describe_text_sample(self.train, i) for i in indices])
                for indices, _ in zip(sampler, range(num_microbatches))]


def chunk_iterators(cfg: RunConfig, dataset, num_chunks: int, consumed_samples: int) -> List[Optional[Iterator]]:
    """First-stage chunks read tokens, last-stage chunks read labels; each gets its own
    iterator over the same microbatch sequence (middle stages get None)."""
    vpp = cfg.parallel.vpp
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    iterators: List[Optional[Iterator]] = []
    for i in range(num_chunks):
        vp = i if vpp else None
        reads = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp) or (
            parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp)
        )
        if not reads:
            iterators.append(None)
            continue
        sampler = DataParallelSampler(len(dataset), consumed_samples, cfg.train.micro_batch_size, dp_rank, dp_size)
        iterators.append(text_microbatches(dataset, sampler, num_workers=cfg.data.num_workers))
    return iterators


def eval_samples(cfg: RunConfig) -> int:
    return cfg.train.eval_iters * cfg.train.global_batch_size if cfg.train.eval_interval else 0


def build_text_data(cfg: RunConfig) -> TextData:
    tokenizer = build_tokenizer(cfg.data, vocab_size=cfg.model.vocab_size)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}; "
            "raise model.vocab_size to at least the tokenizer's size"
        )
    cache_dir = cfg.data.cache_dir or os.path.join(cfg.train.output_dir, "data_cache")
    n_train = cfg.train.steps * cfg.train.global_batch_size
    train, valid, _ = build_text_datasets(
        cfg.data, tokenizer, seed=cfg.train.seed, num_samples=(n_train, eval_samples(cfg), 0), cache_dir=cache_dir
    )
    return TextData(train=train, valid=valid if eval_samples(cfg) else None)
