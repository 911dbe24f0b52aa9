"""M-RoPE at the TransformerConfig level (issues 18, 19): the omni model's config is built with
`mrope_section` (what megatron's rotation reads for M-RoPE) and never TE's fused RoPE, whose bshd
kernel would broadcast one row's per-token freqs over the batch; building the model changes none
of its arguments.  Runs with fused RoPE unavailable (CPU): megatron's attention then rotates every
row with its own freqs, as the unfused reference."""

import logging
from pathlib import Path

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

from megatron_omni.config import ParallelConfig
from megatron_omni.config.loader import load_section_file
from megatron_omni.config.schema import ModelConfig, OmniConfig
from megatron_omni.convert.mcore_io import megatron_world
from megatron_omni.models.kernels import Kernels
from megatron_omni.models.llama import gpt_model_kwargs, transformer_config
from megatron_omni.models.omni import OmniModel, build_omni_chunks, omni_vocab

REPO = Path(__file__).resolve().parents[2]


def _tiny():
    return (load_section_file(ModelConfig, str(REPO / "configs/model/tiny_llm.yaml")),
            load_section_file(OmniConfig, str(REPO / "configs/model/omni_tiny.yaml")))


def test_config_built_for_mrope_has_no_fused_rope_with_a_log_line(caplog):
    llm, _ = _tiny()
    te = Kernels(transformer_engine=True, apex=False, cuda=False)  # what Transformer Engine would give
    with caplog.at_level(logging.INFO, logger="megatron_omni.models.llama"):
        config = transformer_config(llm, ParallelConfig(), torch.float32, te, mrope_section=(2, 3, 3))
    assert config.mrope_section == [2, 3, 3] and config.apply_rope_fusion is False
    assert any("apply_rope_fusion off" in r.getMessage() for r in caplog.records)
    plain = transformer_config(llm, ParallelConfig(), torch.float32, Kernels(False, False, False))
    assert plain.mrope_section is None and plain.apply_rope_fusion is False


def test_building_the_omni_model_mutates_nothing_it_is_given():
    llm, omni = _tiny()
    with megatron_world():
        (kwargs,) = gpt_model_kwargs(llm, ParallelConfig(), seq_length=32, params_dtype=torch.float32,
                                     vocab_size=omni_vocab(llm, omni).size, mrope_section=omni.mrope_section)
        spec, config = kwargs["transformer_layer_spec"], kwargs["config"]
        before = (repr(spec), repr(config))
        for backend in ("dense", "torch"):
            model = OmniModel(omni=omni, vocab=omni_vocab(llm, omni), packed_attention=backend, **kwargs)
            assert (repr(spec), repr(config)) == before
            assert model.config is config and model.transformer_layer_spec is not spec
        # a config built without the omni model's M-RoPE split is refused, not patched
        (plain,) = gpt_model_kwargs(llm, ParallelConfig(), seq_length=32, params_dtype=torch.float32)
        with pytest.raises(ValueError, match="mrope_section"):
            OmniModel(omni=omni, vocab=omni_vocab(llm, omni), **plain)


def test_omni_model_config_carries_mrope_section_and_rotates_per_row():
    llm, omni = _tiny()
    with megatron_world():
        (model,) = build_omni_chunks(llm, ParallelConfig(), omni, seq_length=32, params_dtype=torch.float32)
        config = model.config
        assert config.mrope_section == list(omni.mrope_section) and config.apply_rope_fusion is False
        assert model.decoder.layers[0].self_attention.config is config
        # Two rows with different (t, h, w) positions: megatron's rotation under the model's config
        # == each row rotated alone.
        S, D = 12, config.kv_channels
        pos = torch.stack([torch.arange(S).expand(3, S), torch.randint(0, 5, (3, S))], dim=1)  # [3, 2, S]
        freqs = model.rotary_pos_emb(pos, model.mrope_section)  # [S, 2, 1, D]
        t = torch.randn(S, 2, 2, D)
        got = apply_rotary_pos_emb(t, freqs, config)
        for b in range(2):
            alone = apply_rotary_pos_emb(t[:, b:b + 1], freqs[:, b:b + 1], config)
            torch.testing.assert_close(got[:, b:b + 1], alone, rtol=0, atol=0)
        assert not torch.allclose(got[:, 1], apply_rotary_pos_emb(t[:, 1:], freqs[:, :1], config)[:, 0])
