"""The CP token split follows the 2*cp chunk rule's definition and partitions the stream."""

import pytest
import torch

from megatron_omni.parallel.context_parallel import thd_partitioned_indices


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
