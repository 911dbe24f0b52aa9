"""A data position saved at DP2 continues at DP1 (data/resplit.py): no sample of the epoch lost,
none repeated when the old ranks stood at the same cursor; the bad-sample memory carries over."""

from __future__ import annotations

from megatron_omni.data.media import MediaError
from megatron_omni.data.modality_stream import LoaderConfig, ModalitySpec
from megatron_omni.data.omni_loader import OmniLoader
from megatron_omni.data.resplit import resplit_source_state
from megatron_omni.data.sample_order import SampleOrder
from megatron_omni.data.synthetic import SyntheticSource
from megatron_omni.models.omni_vocab import OmniVocab

VOCAB = OmniVocab(text_vocab_size=2000, audio_codebook_size=64)
SIZE, SEED = 40, 7
EPOCH = [i for _, i in SampleOrder([SIZE], [1.0], seed=SEED, modality="image").epoch_keys(0).tolist()]
BAD = EPOCH[3]  # a sample DP rank 1 meets early (global position 3 -> rank 3 % 2)


class _Recording(SyntheticSource):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read = []

    def __getitem__(self, index):
        self.read.append(index)
        return super().__getitem__(index)


def _loader(source, dp_rank, dp_size):
    config = LoaderConfig(seq_length=1024, micro_batch_size=1, prefetch=0, seed=SEED, pack=False, max_bad_fraction=0.5)
    return OmniLoader({"image": ModalitySpec([source])}, config, dp_rank=dp_rank, dp_size=dp_size)


def _source():
    return _Recording("image", SIZE, vocab=VOCAB, seed=3, seq_length=1024, fail=lambda i: i == BAD,
                      error=lambda path: MediaError(path, "truncated stream"))


def test_dp2_position_continues_at_dp1_without_loss_or_repeat():
    old_sources = [_source(), _source()]
    states = []
    for rank, src in enumerate(old_sources):
        with _loader(src, rank, 2) as loader:
            for _ in range(12):  # 12 of the 20 samples of each rank's half of the epoch
                loader.next_microbatch("image")
            states.append(loader.state_dict())
    new_source = _source()
    with _loader(new_source, 0, 1) as loader:
        loader.load_state_dict(resplit_source_state(states, 0, 1))
        assert loader.bad_samples() == {"image": 1}  # rank 1 met the bad sample: known, never read again
        for _ in range(6):
            loader.next_microbatch("image")
    before = set(old_sources[0].read + old_sources[1].read)
    first_unread = next(i for i in EPOCH if i not in before and i != BAD)
    assert new_source.read[0] == first_unread  # the DP1 run continues at the earliest sample nobody read
    upto = EPOCH.index(new_source.read[-1]) + 1
    assert set(EPOCH[:upto]) - {BAD} <= before | set(new_source.read)  # nothing of the epoch lost
    assert len(before & set(new_source.read)) <= 1  # at most (old dp - 1) samples read twice
    assert BAD not in new_source.read


def test_unequal_cursors_lose_nothing():
    old_sources = [_source(), _source()]
    states = []
    for rank, (src, n) in enumerate(zip(old_sources, (9, 4))):
        with _loader(src, rank, 2) as loader:
            for _ in range(n):
                loader.next_microbatch("image")
            states.append(loader.state_dict())
    new_source = _source()
    with _loader(new_source, 0, 1) as loader:
        loader.load_state_dict(resplit_source_state(states, 0, 1))
        for _ in range(30):
            loader.next_microbatch("image")
    epoch = EPOCH
    seen = set(old_sources[0].read + old_sources[1].read + new_source.read)
    assert set(epoch) - {BAD} <= seen
