"""M-RoPE: position ids vs transformers' Qwen2-VL / Qwen2.5-VL get_rope_index (bit-for-bit; the legacy
rule vs Qwen2.5-Omni's), and the omni model's rotation -- `MRoPEEmbedding` freqs rotated by megatron's
`apply_rotary_pos_emb` under the attention config `models/llama.py::transformer_config(mrope_section=)` builds, bshd and packed THD, as
megatron's attention calls it -- vs HF's multimodal rotary embedding (fp32)."""

import random
from types import SimpleNamespace

import pytest
import torch

from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer import TransformerConfig

from megatron_omni.models.rope import MRoPEEmbedding, mrope_position_ids

qwen2_vl = pytest.importorskip("transformers.models.qwen2_vl.modeling_qwen2_vl")
qwen2_5_vl = pytest.importorskip("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
qwen2_5_omni = pytest.importorskip("transformers.models.qwen2_5_omni.modeling_qwen2_5_omni")

IMG, VID, AUD, VS, VE, AS, PAD = 151655, 151656, 151646, 151652, 151653, 151647, 0
MERGE = 2
ONE_RANK = SimpleNamespace(size=lambda: 1, rank=lambda: 0)  # the context-parallel group rotary reads (no CP)


def _text(rng, n):
    return [rng.randrange(10, 1000) for _ in range(n)]


# ---------------------------------------------------------------- Qwen2-VL / Qwen2.5-VL


def _vl_batch(seed, B=3, max_items=4, long_video=False):
    rng = random.Random(seed)
    seqs, imgs, vids = [], [], []
    for _ in range(B):
        s = _text(rng, rng.randrange(1, 6))
        for _ in range(rng.randrange(0, max_items + 1)):
            h, w = rng.choice([2, 4, 6, 8]), rng.choice([2, 4, 6, 10])
            if rng.random() < 0.5:
                imgs.append([1, h, w]); tok = IMG; n = h * w // 4
            else:
                t = rng.randrange(6, 10) if long_video else rng.randrange(1, 5)
                vids.append([t, h, w]); tok = VID; n = t * h * w // 4
            s += [VS] + [tok] * n + [VE] + _text(rng, rng.randrange(0, 5))
        seqs.append(s)
    S = max(len(s) for s in seqs) + 2
    ids = torch.full((B, S), PAD, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    for b, s in enumerate(seqs):
        off = 0 if b % 2 == 0 else S - len(s)  # right and left padding
        ids[b, off:off + len(s)] = torch.tensor(s)
        mask[b, off:off + len(s)] = 1
    img = torch.tensor(imgs, dtype=torch.long) if imgs else None
    vid = torch.tensor(vids, dtype=torch.long) if vids else None
    return ids, mask, img, vid


class _FakeVL:
    get_vision_position_ids = qwen2_vl.Qwen2VLModel.get_vision_position_ids

    def __init__(self, tokens_per_second=None):
        self.config = SimpleNamespace(vision_config=SimpleNamespace(
            spatial_merge_size=MERGE, tokens_per_second=tokens_per_second))


def _mm_types(ids):
    return (ids == IMG).int() + 2 * (ids == VID).int()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("use_mask", [True, False])
def test_qwen2_vl_position_ids(seed, use_mask):
    ids, mask, img, vid = _vl_batch(seed, long_video=seed % 2 == 1)
    if not use_mask:
        mask = None
    ref_pos, ref_d = qwen2_vl.Qwen2VLModel.get_rope_index(
        _FakeVL(), ids, _mm_types(ids), img, vid, attention_mask=mask)
    pos, d = mrope_position_ids(ids, img, vid, mask, image_token_id=IMG, video_token_id=VID,
                                vision_start_token_id=VS, spatial_merge_size=MERGE)
    assert pos.shape == (3, *ids.shape) and pos.dtype == torch.int64
    assert torch.equal(pos, ref_pos)
    assert d.shape == (ids.shape[0], 1) and torch.equal(d, ref_d)


@pytest.mark.parametrize("seed", range(4))
def test_qwen2_5_vl_second_per_grid(seed):
    ids, mask, img, vid = _vl_batch(seed + 100)
    nv = 0 if vid is None else len(vid)
    spg = torch.tensor([0.5, 1.0, 2.0, 0.3, 1.7] * 10)[:nv] if nv else None
    ref_pos, ref_d = qwen2_5_vl.Qwen2_5_VLModel.get_rope_index(
        _FakeVL(tokens_per_second=2), ids, _mm_types(ids), img, vid, second_per_grid_ts=spg,
        attention_mask=mask)
    pos, d = mrope_position_ids(ids, img, vid, mask, image_token_id=IMG, video_token_id=VID,
                                vision_start_token_id=VS, spatial_merge_size=MERGE,
                                second_per_grid_ts=spg, tokens_per_second=2)
    assert torch.equal(pos, ref_pos) and torch.equal(d, ref_d)


def test_legacy_qwen2_vl_hand_example():
    # 2 text, vs, video t=3 h'=1 w'=2, ve, 1 text: legacy continues from max+1 (t axis!).
    ids = torch.tensor([[5, 6, VS] + [VID] * 6 + [VE, 7]])
    vid = torch.tensor([[3, 2, 4]])
    kw = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS,
              spatial_merge_size=MERGE)
    pos, d = mrope_position_ids(ids, None, vid, legacy=True, **kw)
    exp_t = [0, 1, 2, 3, 3, 4, 4, 5, 5, 6, 7]
    exp_h = [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7]
    exp_w = [0, 1, 2, 3, 4, 3, 4, 3, 4, 6, 7]
    assert pos[:, 0].tolist() == [exp_t, exp_h, exp_w] and d.item() == 8 - 11
    pos5, _ = mrope_position_ids(ids, None, vid, **kw)  # HF 5.x: continue from 3 + max(h', w')
    assert pos5[:, 0, 9:].tolist() == [[5, 6]] * 3


# ---------------------------------------------------------------- legacy rule vs Qwen2.5-Omni


class _FakeOmni:
    P = qwen2_5_omni.Qwen2_5OmniPreTrainedModelForConditionalGeneration
    get_llm_pos_ids_for_vision = P.get_llm_pos_ids_for_vision
    get_chunked_index = P.get_chunked_index
    get_rope_index = P.get_rope_index

    def __init__(self, pps, spc):
        self.spatial_merge_size = MERGE
        self.config = SimpleNamespace(
            image_token_id=IMG, video_token_id=VID, audio_token_id=AUD,
            vision_start_token_id=VS, audio_start_token_id=AS,
            position_id_per_seconds=pps, seconds_per_chunk=spc)


@pytest.mark.parametrize("seed", range(4))
def test_legacy_qwen2_vl_equals_omni_without_time_scaling(seed):
    """Original Qwen2-VL rule (max+1, pad 1) == Omni with 1 position/s, 1 s/grid, no audio."""
    ids, mask, img, vid = _vl_batch(seed + 50, long_video=True)
    spg = torch.ones(len(vid)) if vid is not None else None
    ref = _FakeOmni(1, 2).get_rope_index(ids, img, vid, mask, second_per_grids=spg)
    out = mrope_position_ids(ids, img, vid, mask, image_token_id=IMG, video_token_id=VID,
                             vision_start_token_id=VS, spatial_merge_size=MERGE, legacy=True)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


# ---------------------------------------------------------------- rotation


@pytest.mark.parametrize("head_dim,section", [(128, [16, 24, 24]), (16, [2, 3, 3]),
                                              (16, [4, 2, 2]), (64, [8, 12, 12])])
def test_rotation_matches_hf(head_dim, section):
    torch.manual_seed(0)
    ids, mask, img, vid = _vl_batch(7)
    pos, _ = mrope_position_ids(ids, img, vid, mask, image_token_id=IMG, video_token_id=VID,
                                vision_start_token_id=VS, spatial_merge_size=MERGE)
    B, S = ids.shape
    H, base = 3, 1000000
    cfg = qwen2_vl.Qwen2VLTextConfig(
        hidden_size=H * head_dim, num_attention_heads=H, num_key_value_heads=H,
        rope_parameters={"rope_type": "default", "rope_theta": base, "mrope_section": section})
    q = torch.randn(B, H, S, head_dim) * 3
    cos, sin = qwen2_vl.Qwen2VLRotaryEmbedding(cfg)(q, pos)
    ref, _ = qwen2_vl.apply_rotary_pos_emb(q, q, cos, sin)

    # The omni model's path: its rotary embedding's freqs, megatron's rotation under its attention config.
    freqs = MRoPEEmbedding(kv_channels=head_dim, rotary_base=base, device="cpu")(pos, section)  # [S, B, 1, D]
    assert freqs.shape == (S, B, 1, head_dim)
    config = TransformerConfig(num_layers=1, hidden_size=H * head_dim, num_attention_heads=H, kv_channels=head_dim,
                               mrope_section=list(section), apply_rope_fusion=False)  # as transformer_config sets
    out = apply_rotary_pos_emb(q.permute(2, 0, 1, 3), freqs, config, cp_group=ONE_RANK)  # [S, B, H, D]
    torch.testing.assert_close(out.permute(1, 2, 0, 3), ref, atol=1e-6, rtol=1e-6)

    # packed THD (sample 0 then sample 1, valid tokens only; per-token freqs of the stream) == HF per sample
    toks = [q[b].permute(1, 0, 2)[mask[b].bool()] for b in range(2)]
    fr = [freqs[:, b][mask[b].bool()] for b in range(2)]  # [n, 1, D] each; THD takes [T, 1, 1, D]
    cu = torch.tensor([0, len(toks[0]), len(toks[0]) + len(toks[1])], dtype=torch.int32)
    packed = apply_rotary_pos_emb(torch.cat(toks), torch.cat(fr)[:, None], config, cu_seqlens=cu, cp_group=ONE_RANK)
    exp = torch.cat([ref[b].permute(1, 0, 2)[mask[b].bool()] for b in range(2)])
    torch.testing.assert_close(packed, exp, atol=1e-6, rtol=1e-6)


def test_embedding_equals_megatron_upstream(monkeypatch):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import (
        MultimodalRotaryEmbedding,
    )

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    up = MultimodalRotaryEmbedding(kv_channels=64, rotary_percent=1.0, rotary_base=10000)
    ours = MRoPEEmbedding(kv_channels=64, rotary_base=10000, device="cpu")
    pos = torch.randint(0, 500, (3, 2, 37))
    assert torch.equal(up.inv_freq, ours.inv_freq)
    assert torch.equal(up(pos, [8, 12, 12]), ours(pos, [8, 12, 12]))
