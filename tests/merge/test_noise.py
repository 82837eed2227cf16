"""The counter-based random draws behind the partitions."""

from __future__ import annotations

import math

import torch

from imptome.merge import cell_partition, importance_partition
from imptome.merge.noise import mix32, random_bits, stream_id


def test_mixer_is_a_bijection_and_agrees_on_ints_and_tensors():
    values = torch.arange(1 << 20, dtype=torch.int64) * 4099  # spread over the 32-bit range
    mixed = mix32(values)
    assert mixed.unique().numel() == values.numel()
    assert int(mixed.min()) >= 0 and int(mixed.max()) < 2**32
    assert [mix32(int(v)) for v in values[:50]] == mixed[:50].tolist()


def test_stream_ids_differ_by_part_order_length_and_high_bits():
    ids = {stream_id(*parts) for parts in [(0,), (1,), (0, 0), (0, 1), (1, 0), (2**32,), (2**32 + 1,)]}
    assert len(ids) == 7


def test_random_bits_are_distinct_keyed_and_do_not_depend_on_batch_size():
    key = torch.tensor(stream_id(3))
    bits = random_bits(key, (4, 500))
    assert bits.unique().numel() == bits.numel()
    assert torch.equal(random_bits(key, (2, 500)), bits[:2])  # row u keeps its draws in a larger batch
    assert (random_bits(torch.tensor(stream_id(4)), (4, 500)) != bits).float().mean() > 0.99


def test_destination_draws_are_uniform_over_the_pool():
    """Over 2000 keys each of the M pool members is drawn with probability D/M; the counts stay within 5
    binomial standard deviations (a deterministic check: the keys are fixed)."""
    num_dst, num_pool, keys = 16, 64, 2000
    importance = torch.arange(100, 0, -1, dtype=torch.float32).unsqueeze(0)  # pool = tokens 0..63
    counts = torch.zeros(100)
    for key in range(keys):
        dst, _ = importance_partition(importance, num_dst, num_pool, torch.tensor(stream_id(key)))
        counts[dst[0]] += 1
    p = num_dst / num_pool
    assert counts[num_pool:].sum() == 0
    spread = 5 * math.sqrt(keys * p * (1 - p))
    assert (counts[:num_pool] - keys * p).abs().max() < spread


def test_cell_offsets_are_uniform():
    offsets = torch.cat([cell_partition(1, (8, 8), 2, 2, torch.tensor(stream_id(k))) for k in range(500)])
    row, col = offsets // 8 % 2, offsets % 8 % 2
    counts = torch.bincount((row * 2 + col).flatten(), minlength=4).float()
    expected = offsets.numel() / 4
    assert (counts - expected).abs().max() < 5 * math.sqrt(expected * 0.75)
