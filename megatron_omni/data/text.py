"""Build the train/valid/test GPT datasets of a `DataConfig` with megatron-core.

This is a thin adapter: megatron-core's `BlendedMegatronDatasetBuilder` + `GPTDataset` do
the splitting, blending, shuffling, sample packing and index caching exactly as in
Megatron-LM; we only map `DataConfig` onto `GPTDatasetConfig`, resolve each blend entry
to an indexed-dataset prefix (tokenizing `.jsonl`/`.txt` on first use, see `sources.py`),
and catch the configurations megatron would hang or crash on with an unhelpful message.

Works inside any process group - megatron's builder makes rank 0 write the index cache
first and the other ranks load it after a barrier, so `cache_dir` must be shared by all
ranks - and without one (see `process_group.py` for how).
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Tuple, Union

from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split

from megatron_omni.config.schema import DataConfig
from megatron_omni.data.process_group import process_group_for_dataset_build
from megatron_omni.data.sources import resolve_source
from megatron_omni.data.tokenizer import TextTokenizer

__all__ = ["build_text_datasets", "describe_text_sample", "TextDatasets"]

# One entry per Split (train, valid, test): a GPTDataset for one source, a BlendedDataset
# for several, None where the split fraction is 0.  Items are dicts of 1-D tensors.
TextDataset = Union[GPTDataset, BlendedDataset]
TextDatasets = Tuple[Optional[TextDataset], Optional[TextDataset], Optional[TextDataset]]


def _check_blend(data_cfg: DataConfig) -> None:
    if not data_cfg.blend:
        raise ValueError("data.blend is empty: name at least one data source (path: ..., weight: ...)")
    for i, source in enumerate(data_cfg.blend):
        if not source.path:
            raise ValueError(f"data.blend[{i}].path is empty")
        if not source.weight > 0:
            raise ValueError(f"data.blend[{i}].weight must be > 0, got {source.weight}")


def _check_splits_have_documents(prefixes: Sequence[str], split: str) -> None:
    """GPTDataset loops forever on a split that got zero documents; fail clearly instead.

    Uses megatron's own split arithmetic (the same rounding the builder applies).
    """
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for prefix in prefixes:
        n = len(IndexedDataset(prefix).sequence_lengths)
        for s in Split:
            bounds = matrix[s.value]
            if bounds is None:
                continue
            if int(round(bounds[1] * n)) - int(round(bounds[0] * n)) <= 0:
                raise ValueError(
                    f"data.split={split!r} leaves the {s.name} split of {prefix} ({n} documents) "
                    f"without a document; give it a larger share, set it to 0, or add documents"
                )


def build_text_datasets(
    data_cfg: DataConfig,
    tokenizer: TextTokenizer,
    *,
    seed: int,
    num_samples: Tuple[int, int, int],
    cache_dir: str,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
) -> TextDatasets:
    """(train, valid, test) datasets holding at least `num_samples` samples each.

    Asking for the samples the run will consume (train steps x global batch, eval samples)
    lets GPTDataset lay out enough epochs up front, so the sampler never has to wrap.
    `is_built_on_rank` is megatron's hook to skip building on ranks that never read data
    (e.g. middle pipeline stages); the default builds everywhere.  Every rank must call
    this function (it contains collectives when torch.distributed is initialized).
    """
    _check_blend(data_cfg)
    if len(num_samples) != len(Split) or any(n < 0 for n in num_samples):
        raise ValueError(f"num_samples must be 3 non-negative ints (train, valid, test), got {num_samples}")
    os.makedirs(cache_dir, exist_ok=True)
    with process_group_for_dataset_build():
        prefixes: List[str] = [
            resolve_source(s.path, s.text_key, tokenizer, cache_dir) for s in data_cfg.blend
        ]
        _check_splits_have_documents(prefixes, data_cfg.split)
        # A single source takes megatron's plain-GPTDataset path (weights None); several
        # are blended by weight.
        weights = None if len(prefixes) == 1 else [float(s.weight) for s in data_cfg.blend]
        config = GPTDatasetConfig(
            random_seed=seed,
            sequence_length=data_cfg.seq_length,
            blend=(prefixes, weights),
            split=data_cfg.split,
            path_to_cache=os.path.join(cache_dir, "gpt_indices"),
            tokenizer=tokenizer,
            reset_position_ids=data_cfg.reset_position_ids,
            reset_attention_mask=data_cfg.reset_attention_mask,
            eod_mask_loss=data_cfg.eod_mask_loss,
            create_attention_mask=False,
        )
        builder = BlendedMegatronDatasetBuilder(
            GPTDataset, list(num_samples), is_built_on_rank or (lambda: True), config
        )
        train, valid, test = builder.build()
    return train, valid, test


def describe_text_sample(dataset: TextDataset, index: int) -> str:
    """``train sample I (PREFIX documents [d, ...])``: sample `index` of the (blended) train dataset,
    the indexed dataset it comes from and the documents it spans (their order in the tokenized
    corpus, empty documents skipped).  Reads the sample's indices once; for logs, not the hot path."""
    name = f"train sample {index}"
    if isinstance(dataset, BlendedDataset):
        dataset, index = dataset.datasets[dataset.dataset_index[index]], int(dataset.dataset_sample_index[index])
        name += f" = {index}"
    # megatron's own index lookup (shuffle -> sample -> document index), as __getitem__ does it
    _, documents = dataset._query_document_sample_shuffle_indices(index)
    return f"{name} ({os.path.basename(dataset.dataset_path or '?')} documents {documents.tolist()})"
