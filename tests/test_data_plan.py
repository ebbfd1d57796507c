"""The epoch plan: equal shares, full coverage, duplicates only in the wrap, seeded orders."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from emi.data.plan import (
    Segment,
    consumer_segments,
    cycle_segments,
    resampled_segments,
    samples_per_consumer,
    shard_order,
    shuffle_buffer_order,
    take_samples,
    whole_shards,
    worker_skip_batches,
)


def expand(segments: list[Segment]) -> list[tuple[int, int]]:
    return [(s.shard, i) for s in segments for i in range(s.start, s.stop)]


def epoch_slices(sizes, consumers, batch, drop_last, epoch=0, seed=7, shuffle=True):
    order = shard_order(len(sizes), seed, epoch, shuffle)
    per = samples_per_consumer(sum(sizes), consumers, batch, drop_last)
    return per, [expand(consumer_segments(whole_shards(sizes, order), c, per)) for c in range(consumers)]


CASES = [  # shard sizes, world size x workers, per-rank batch
    ([7, 13, 20], 4, 2),
    ([7, 13, 22], 4, 2),
    ([7, 13, 22], 4, 3),
    ([5, 0, 9, 1], 3, 4),
    ([3], 2, 8),
    ([10, 10, 10, 10], 8, 5),
    ([1, 2, 3, 4, 5, 6], 6, 1),
]


@pytest.mark.parametrize("sizes,consumers,batch", CASES)
def test_every_consumer_gets_whole_batches_and_the_union_covers_the_data_set(sizes, consumers, batch):
    total = sum(sizes)
    per, slices = epoch_slices(sizes, consumers, batch, drop_last=False)
    everything = {(shard, i) for shard, size in enumerate(sizes) for i in range(size)}
    assert per % batch == 0 and per >= total / consumers
    assert all(len(s) == per for s in slices)
    assert set(itertools.chain(*slices)) == everything
    sequence = list(itertools.chain(*slices))
    # The first N planned samples are the data set once; the rest (< one batch per consumer) wrap around
    # to the start of the sequence.
    assert len(set(sequence[:total])) == total
    assert sequence[total:] == [sequence[i % total] for i in range(total, len(sequence))]
    assert len(sequence) - total < batch * consumers
    if total % (batch * consumers) == 0:
        assert len(sequence) == total


@pytest.mark.parametrize("sizes,consumers,batch", [c for c in CASES if sum(c[0]) >= c[1] * c[2]])
def test_drop_last_gives_disjoint_equal_shares_and_drops_less_than_a_batch_each(sizes, consumers, batch):
    total = sum(sizes)
    per, slices = epoch_slices(sizes, consumers, batch, drop_last=True)
    sequence = list(itertools.chain(*slices))
    assert all(len(s) == per for s in slices) and per % batch == 0
    assert len(set(sequence)) == len(sequence)
    assert 0 <= total - len(sequence) < batch * consumers


def test_drop_last_with_too_few_samples_is_an_error():
    with pytest.raises(ValueError, match="cannot give each of 4 consumers"):
        samples_per_consumer(7, 4, 2, drop_last=True)


def test_shard_order_is_seeded_per_epoch():
    orders = [shard_order(8, seed=3, epoch=e, shuffle=True) for e in range(4)]
    assert all(sorted(o) == list(range(8)) for o in orders)
    assert len({tuple(o) for o in orders}) == 4
    assert shard_order(8, seed=3, epoch=2, shuffle=True) == orders[2]
    assert shard_order(8, seed=4, epoch=2, shuffle=True) != orders[2]
    assert shard_order(8, seed=3, epoch=2, shuffle=False) == list(range(8))
    _, epoch0 = epoch_slices([4, 6, 5, 7], 2, 2, False, epoch=0)
    _, epoch1 = epoch_slices([4, 6, 5, 7], 2, 2, False, epoch=1)
    assert epoch0 != epoch1 and epoch_slices([4, 6, 5, 7], 2, 2, False, epoch=1)[1] == epoch1


def test_cycle_segments_wraps_through_all_shards_from_any_position():
    sizes, order = [3, 0, 2], [2, 0, 1]
    taken = expand(take_samples(cycle_segments(whole_shards(sizes, order), begin=1), 9))
    assert taken == [(2, 1), (0, 0), (0, 1), (0, 2), (2, 0), (2, 1), (0, 0), (0, 1), (0, 2)]


def test_shuffle_buffer_order_is_a_bounded_seeded_permutation():
    order = list(shuffle_buffer_order(range(100), 8, seed=1, epoch=0, consumer=0))
    assert sorted(order) == list(range(100)) and order != list(range(100))
    # The k-th emitted position has been read by then: at most buffer_size - 1 positions ahead.
    assert all(position <= k + 7 for k, position in enumerate(order))
    assert order == list(shuffle_buffer_order(range(100), 8, seed=1, epoch=0, consumer=0))
    assert order != list(shuffle_buffer_order(range(100), 8, seed=1, epoch=1, consumer=0))
    assert order != list(shuffle_buffer_order(range(100), 8, seed=1, epoch=0, consumer=1))
    assert list(shuffle_buffer_order(range(10), 0, seed=1, epoch=0, consumer=0)) == list(range(10))
    infinite = shuffle_buffer_order(itertools.count(), 8, seed=1, epoch=0, consumer=0)
    assert list(itertools.islice(infinite, 100)) != list(range(100))


def test_resampled_segments_draw_whole_shards_by_size():
    draws = Counter(s.shard for s in itertools.islice(resampled_segments([10, 30, 60], 0, 0, 0), 2000))
    assert all(s.start == 0 for s in itertools.islice(resampled_segments([10, 30, 60], 0, 0, 0), 50))
    assert 0.05 < draws[0] / 2000 < 0.15 and 0.5 < draws[2] / 2000 < 0.7
    first = list(itertools.islice(resampled_segments([10, 30, 60], 0, 0, 0), 20))
    assert first == list(itertools.islice(resampled_segments([10, 30, 60], 0, 0, 0), 20))
    assert first != list(itertools.islice(resampled_segments([10, 30, 60], 0, 0, 1), 20))


def test_worker_skip_batches_follows_the_round_robin():
    # Batches 0..6 of a rank with 3 workers come from workers 0,1,2,0,1,2,0.
    assert [worker_skip_batches(7, w, 3) for w in range(3)] == [3, 2, 2]
    assert [worker_skip_batches(0, w, 3) for w in range(3)] == [0, 0, 0]
    assert [worker_skip_batches(5, w, 1) for w in range(1)] == [5]
