"""The CP token split of packed rows (parallel/context_parallel.py): the 2*cp chunk rule's
definition, segment padding, media on every CP rank, megatron's THD rotary per CP chunk against
models/rope.py, and the bad configs of an omni CP run."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_omni.config import load_config
from megatron_omni.config.loader import ConfigError
from megatron_omni.config.validate import validate
from megatron_omni.parallel.context_parallel import thd_cp_split, thd_partitioned_indices

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_split_is_the_definition_and_a_partition(cp):
    lengths = [8 * cp, 2 * cp, 4 * cp]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    total = int(cu[-1])
    seen = []
    for r in range(cp):
        idx = thd_partitioned_indices(cu, cp, r)
        expected = []
        for s, n in zip(cu[:-1].tolist(), lengths):
            c = n // (2 * cp)
            chunks = [list(range(s + k * c, s + (k + 1) * c)) for k in range(2 * cp)]
            expected += chunks[r] + chunks[2 * cp - 1 - r]
        assert idx.tolist() == expected
        assert idx.numel() == total // cp  # equal token share per rank
        seen += idx.tolist()
    assert sorted(seen) == list(range(total))  # every token on exactly one rank


def test_indivisible_length_is_a_clear_error():
    with pytest.raises(ValueError, match="divisible by 2\\*cp=4"):
        thd_partitioned_indices(torch.tensor([0, 6], dtype=torch.int32), 2, 0)


def test_cp_split_pads_each_segment_and_partitions_the_tokens():
    cu = torch.tensor([0, 5, 13, 16], dtype=torch.int32)  # segments 5, 8, 3
    splits = [thd_cp_split(cu, 2, r, stream_multiple=8) for r in range(2)]
    # each segment padded at its end to a multiple of 2*cp=4; the last one further to 8 | T_pad
    assert splits[0].padded_lengths == [8, 8, 8] and splits[0].cu_seqlens_padded.tolist() == [0, 8, 16, 24]
    stream = splits[0].stream_index
    assert stream.tolist() == [0, 1, 2, 3, 4, 16, 16, 16, *range(5, 13), 13, 14, 15, *[16] * 5]  # 16 = a pad
    for r, split in enumerate(splits):
        assert split.local_index.tolist() == stream[thd_partitioned_indices(split.cu_seqlens_padded, 2, r)].tolist()
        assert split.owned.tolist() == [t in split.local_index.tolist() for t in range(16)]
    assert not (splits[0].owned & splits[1].owned).any() and (splits[0].owned | splits[1].owned).all()
    # the CP all-gather of the ranks' tokens, reordered, is the padded stream
    gathered = torch.cat([s.local_index for s in splits])
    assert gathered[splits[1].gathered_to_stream].tolist() == stream.tolist()
    with pytest.raises(ValueError, match="stream_multiple=6 must be a multiple of 2\\*cp=4"):
        thd_cp_split(cu, 2, 0, stream_multiple=6)


def test_video_and_audio_of_a_mock_microbatch_land_on_both_cp_ranks():
    """The media rows the CP2 omni run (tests/training/test_omni_training.py) splits: both ranks hold
    video and audio tokens (the mock's one-token images open their segments: chunk 0, rank 0)."""
    from megatron_omni.data.mock_omni import MockOmniData
    from megatron_omni.models.omni import omni_vocab

    cfg = load_config(str(REPO / "configs/tiny/omni_mock.yaml"), ["data.seq_length=96", "train.micro_batch_size=1"])
    vocab = omni_vocab(cfg.model, cfg.omni)
    data = MockOmniData(cfg.omni, vocab, seq_length=96, micro_batch_size=1, seed=cfg.train.seed)
    for modality, pad_id in (("video", vocab.video_pad_id), ("audio", vocab.audio_pad_id)):
        batch = data.next_microbatch(modality)
        tokens = batch.tokens.reshape(-1)
        for r in range(2):
            owned = thd_cp_split(batch.cu_seqlens, 2, r).owned
            assert (tokens[owned] == pad_id).any(), (modality, r)


def test_thd_rotary_per_cp_chunk_equals_reference_rotation():
    """megatron's THD rotary (rope_utils, apply_rope_fusion off) given this rank's tokens, the padded
    boundaries and the freqs of the whole padded stream (what OmniModel passes under CP) rotates
    every token as megatron rotates it in the unsplit stream.  The CP group is a stand-in
    with size() / rank(): all the rotary reads of it."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.transformer import TransformerConfig

    from megatron_omni.models.omni import index_with_pad
    from megatron_omni.models.rope import MRoPEEmbedding

    T, H, D, section, cp = 22, 3, 16, [2, 3, 3], 2
    cu = torch.tensor([0, 5, 12, 16, 22], dtype=torch.int32)
    positions = torch.randint(0, 30, (3, 1, T), generator=torch.Generator().manual_seed(4))
    x = torch.randn(T, H, D, generator=torch.Generator().manual_seed(5))
    rotary = MRoPEEmbedding(kv_channels=D, device="cpu")
    config = TransformerConfig(num_layers=1, hidden_size=48, num_attention_heads=3, apply_rope_fusion=False)
    one_rank = SimpleNamespace(size=lambda: 1, rank=lambda: 0)
    # the unsplit stream rotated token by token (bshd, batch 1)
    reference = apply_rotary_pos_emb(x[:, None], rotary(positions, section), config, cp_group=one_rank)[:, 0]
    for r in range(cp):
        split = thd_cp_split(cu, cp, r)
        stream_positions = index_with_pad(positions[:, 0].t(), split.stream_index).t().unsqueeze(1)
        freqs = rotary(stream_positions, section)
        got = apply_rotary_pos_emb(index_with_pad(x, split.local_index), freqs, config,
                                   cu_seqlens=split.cu_seqlens_padded,
                                   cp_group=SimpleNamespace(size=lambda: cp, rank=lambda r=r: r))
        real = split.local_index < T
        torch.testing.assert_close(got[real], reference[split.local_index[real]], rtol=0, atol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    (["model.packed_attention=dense"], "parallel.cp=2 needs a THD packed attention path"),
    (["parallel.pp=2"], "parallel.cp=2 with parallel.pp=2 is not supported for omni runs yet"),
    (["data.seq_length=98"], "data.seq_length=98 must be divisible by 2\\*parallel.cp=4"),
    (["model.packed_attention=te"], "model.packed_attention=te needs Transformer Engine"),
    (["model.cp_comm_type=ring"], "model.cp_comm_type"),
])
def test_bad_omni_cp_configs_are_one_clear_error(overrides, message):
    cfg = load_config(str(REPO / "configs/tiny/omni_mock.yaml"), ["parallel.cp=2", *overrides])
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world_size=4)


def test_omni_cp2_config_is_valid():
    validate(load_config(str(REPO / "configs/tiny/omni_mock.yaml"), ["parallel.cp=2"]), world_size=2)


def test_media_items_split_into_contiguous_runs_of_about_equal_tokens():
    from megatron_omni.parallel.context_parallel import cp_item_range

    assert [cp_item_range([4, 4, 4, 4], 2, r) for r in range(2)] == [(0, 2), (2, 4)]
    assert [cp_item_range([10, 1, 1], 2, r) for r in range(2)] == [(0, 1), (1, 3)]
    assert [cp_item_range([1, 1, 1, 1, 1, 1], 2, r) for r in range(2)] == [(0, 3), (3, 6)]
    # fewer items than ranks: a rank may encode nothing (it still joins the all-gather)
    assert [cp_item_range([5], 2, r) for r in range(2)] == [(0, 1), (1, 1)]
    assert [cp_item_range([], 2, r) for r in range(2)] == [(0, 0), (0, 0)]
