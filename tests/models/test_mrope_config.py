"""M-RoPE at the TransformerConfig level (issue 18): the omni model's config carries
`mrope_section` (what megatron's rotation reads for M-RoPE) and never TE's fused RoPE, whose bshd
kernel would broadcast one row's per-token freqs over the batch.  Runs with fused RoPE unavailable
(CPU): megatron's attention then rotates every row with its own freqs, as the unfused reference."""

import logging
from pathlib import Path

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer import TransformerConfig

from megatron_omni.config import ParallelConfig
from megatron_omni.config.loader import load_section_file
from megatron_omni.config.schema import ModelConfig, OmniConfig
from megatron_omni.convert.mcore_io import megatron_world
from megatron_omni.models.omni import build_omni_chunks
from megatron_omni.models.rope import configure_mrope_attention

REPO = Path(__file__).resolve().parents[2]


def _config():
    return TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, kv_channels=16)


def test_config_level_decision_turns_fusion_off_with_a_log_line(caplog):
    config = _config()
    config.apply_rope_fusion = True  # what models/llama.py sets with Transformer Engine
    with caplog.at_level(logging.INFO, logger="megatron_omni.models.rope"):
        configure_mrope_attention(config, (2, 3, 3))
    assert config.mrope_section == [2, 3, 3] and config.apply_rope_fusion is False
    assert any("apply_rope_fusion off" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="megatron_omni.models.rope"):
        configure_mrope_attention(config, (2, 3, 3))  # nothing to turn off: no line
    assert not caplog.records


def test_omni_model_config_carries_mrope_section_and_rotates_per_row():
    llm = load_section_file(ModelConfig, str(REPO / "configs/model/tiny_llm.yaml"))
    omni = load_section_file(OmniConfig, str(REPO / "configs/model/omni_tiny.yaml"))
    with megatron_world():
        (model,) = build_omni_chunks(llm, ParallelConfig(), omni, seq_length=32, params_dtype=torch.float32)
        config = model.config
        assert config.mrope_section == list(omni.mrope_section) and config.apply_rope_fusion is False
        assert model.decoder.layers[0].self_attention.config is config
        # Two rows with different (t, h, w) positions: megatron's rotation under the model's config
        # == each row rotated alone.
        S, D = 12, config.kv_channels
        pos = torch.stack([torch.arange(S).expand(3, S), torch.randint(0, 5, (3, S))], dim=1)  # [3, 2, S]
        freqs = model.rotary_pos_emb(pos, model.mrope_section)  # the model's own freqs, [S, 2, 1, D]
        t = torch.randn(S, 2, 2, D)
        got = apply_rotary_pos_emb(t, freqs, config)
        for b in range(2):
            alone = apply_rotary_pos_emb(t[:, b:b + 1], freqs[:, b:b + 1], config)
            torch.testing.assert_close(got[:, b:b + 1], alone, rtol=0, atol=0)
        assert not torch.allclose(got[:, 1], apply_rotary_pos_emb(t[:, 1:], freqs[:, :1], config)[:, 0])
