"""Every run-config key reaches what it configures (issue 19): each key changed from its default,
the run's own builders (the omni blend loader of `training/omni_data.py`, the model builders,
`config/validate.py`) give components that hold the changed value or behave by it.  One process."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from megatron_omni.config import load_config
from megatron_omni.config.loader import ConfigError
from megatron_omni.config.schema import DataConfig, ModelConfig
from megatron_omni.config.validate import validate
from megatron_omni.models.kernels import detect_kernels
from megatron_omni.parallel.initialize import initialize_distributed, set_random_seeds

# loader key -> a value other than its default
LOADER_KEYS = {"lookahead": 7, "lookahead_mib": 3.5, "prefetch": 0, "decode_workers": 3, "pin_memory": False,
               "max_bad_fraction": 0.25}


def test_loader_keys_reach_the_runs_loader(demo_data, one_rank_world, tmp_path):
    from megatron_omni.models.omni import omni_vocab
    from megatron_omni.training.omni_data import build_blend_loader

    defaults = DataConfig()
    assert all(getattr(defaults, k) != v for k, v in LOADER_KEYS.items())
    cfg = load_config("configs/tiny/pt_stage3.yaml", [f"data.root={demo_data}", "data.seq_length=256",
                                                      f"train.output_dir={tmp_path}",
                                                      *(f"data.{k}={v}" for k, v in LOADER_KEYS.items())])
    initialize_distributed(cfg.parallel)
    loader, _ = build_blend_loader(cfg, omni_vocab(cfg.model, cfg.omni), dp_rank=0)
    with loader:
        assert {k: getattr(loader.config, k) for k in LOADER_KEYS} == LOADER_KEYS
        pool = loader.decode_pool  # one pool of data.decode_workers threads for every modality
        assert pool is not None and pool._max_workers == 3
        for modality in loader.modalities:
            stream, prefetching = loader._streams[modality], loader._prefetch[modality]
            assert prefetching.depth == 0  # data.prefetch=0: built on request, no thread
            assert stream._pool is pool
            assert stream._buffer.capacity == 7 and stream._buffer.max_bytes == int(3.5 * 2 ** 20)
            assert stream.config.max_bad_fraction == 0.25 and stream.config.pin_memory is False
        first = "text"  # the cheapest to build
        batch = loader.next_microbatch(first)
        assert batch.tokens.shape == (cfg.train.micro_batch_size, 256)
        assert 1 <= len(pool._threads) <= 3  # the samples were decoded by the pool's threads
        assert loader._prefetch[first]._thread is None


def test_deterministic_mode_reaches_megatron(one_rank_world):
    from megatron_omni.models.llama import build_llama_chunks

    assert ModelConfig().deterministic_mode is False
    cfg = load_config("configs/tiny/llm.yaml", ["model.deterministic_mode=true"])
    initialize_distributed(cfg.parallel)
    set_random_seeds(cfg.train.seed)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        (chunk,) = build_llama_chunks(cfg.model, cfg.parallel, seq_length=32, params_dtype=torch.float32)
        assert chunk.config.deterministic_mode
        assert chunk.embedding.word_embeddings.deterministic_mode  # megatron's deterministic embedding backward
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(was)


def test_max_position_embeddings_bounds_the_sequence_length():
    cfg = load_config("configs/tiny/llm.yaml", ["data.seq_length=1024"])  # tiny_llm: 1024 positions
    validate(cfg, world_size=1)
    longer = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_length=1025))
    with pytest.raises(ConfigError, match=r"data.seq_length=1025 .* model.max_position_embeddings=1024"):
        validate(longer, world_size=1)


@pytest.mark.parametrize("rope_scaling", [True, False])
def test_rope_scaling_reaches_the_omni_models_rotary(one_rank_world, rope_scaling):
    """The omni model's M-RoPE frequencies are the LLM's 1D RoPE ones, Llama-3.1 scaling included
    or not as model.rope_scaling says (reference: megatron's own `RotaryEmbedding`)."""
    from megatron_omni.models.omni import build_omni_chunks

    cfg = load_config("configs/tiny/omni_mock.yaml", [f"model.rope_scaling={str(rope_scaling).lower()}",
                                                      "model.rope_scaling_factor=4.0"])
    initialize_distributed(cfg.parallel)
    set_random_seeds(cfg.train.seed)
    (model,) = build_omni_chunks(cfg.model, cfg.parallel, cfg.omni, seq_length=32, params_dtype=torch.float32)
    m = cfg.model
    reference = RotaryEmbedding(m.head_dim, 1.0, rotary_base=int(m.rotary_base), rope_scaling=rope_scaling,
                                rope_scaling_factor=4.0, use_cpu_initialization=True)
    assert torch.equal(model.rotary_pos_emb.inv_freq, reference.inv_freq)
    assert model.mrope_section == list(cfg.omni.mrope_section) and model.position_embedding_type == "mrope"


def test_deterministic_mode_on_a_gpu_needs_the_cublas_environment(monkeypatch):
    """cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it starts: a GPU run without it stops at the config
    check, naming the variable (CUDA availability is what the check asks torch)."""
    cfg = load_config("configs/tiny/llm.yaml", ["model.deterministic_mode=true", "model.transformer_impl=local"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="CUBLAS_WORKSPACE_CONFIG=:4096:8"):
        validate(cfg, world_size=1)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        validate(cfg, world_size=1)
    finally:  # nothing detected under the pretended GPU outlives the test
        detect_kernels.cache_clear()
