"""Epoch planning: which samples each consumer (rank, dataloader worker) reads, in which order.

All samples of an epoch are laid end to end in a (seeded) shard order; consumer c reads the contiguous
slice [c*P, (c+1)*P) of that sequence, wrapping to its start for the few samples past the end. P is the
same for every consumer, so every rank yields the same number of batches. Everything here is a pure
function of (sizes, seed, epoch, consumer): the plan is the same in every process and after a restart.
"""
from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

# Distinct seed streams for the separate random choices of one (seed, epoch).
_SHARD_ORDER, _SHUFFLE_BUFFER, _RESAMPLE = 0, 1, 2


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of shard number `shard`, read as one run."""

    shard: int
    start: int
    stop: int


def samples_per_consumer(num_samples: int, consumers: int, batch_size: int, drop_last: bool) -> int:
    """P: ceil(N / C) rounded up to whole batches, or with drop_last floor(N / C) rounded down."""
    if drop_last:
        per_consumer = num_samples // consumers // batch_size * batch_size
        if per_consumer == 0:
            raise ValueError(f"{num_samples} samples cannot give each of {consumers} consumers "
                             f"(ranks x workers) a full batch of {batch_size} with drop_last=True")
        return per_consumer
    return math.ceil(math.ceil(num_samples / consumers) / batch_size) * batch_size


def resampled_batches(num_samples: int, consumers: int, batch_size: int) -> int:
    """Batches per consumer per epoch in resampled mode: one pass over the data set between all of them."""
    return math.ceil(num_samples / (consumers * batch_size))


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(num_shards))
    return np.random.default_rng([seed, epoch, _SHARD_ORDER]).permutation(num_shards).tolist()


def cycle_segments(sizes: Sequence[int], order: Sequence[int], begin: int) -> Iterator[Segment]:
    """The sequence of all samples (shards in `order`, laid end to end) from position `begin`, repeated
    without end."""
    order = [shard for shard in order if sizes[shard] > 0]
    starts = list(itertools.accumulate((sizes[shard] for shard in order), initial=0))
    total = starts.pop()
    position = begin % total
    k = bisect.bisect_right(starts, position) - 1
    yield Segment(order[k], position - starts[k], sizes[order[k]])
    while True:
        k = (k + 1) % len(order)
        yield Segment(order[k], 0, sizes[order[k]])


def take_samples(segments: Iterable[Segment], count: int) -> list[Segment]:
    """The leading `count` samples of a segment stream, the last segment cut short."""
    taken = []
    for segment in segments:
        if count <= 0:
            break
        stop = min(segment.stop, segment.start + count)
        taken.append(Segment(segment.shard, segment.start, stop))
        count -= stop - segment.start
    return taken


def consumer_segments(sizes: Sequence[int], order: Sequence[int], consumer: int,
                      per_consumer: int) -> list[Segment]:
    """Consumer `consumer`'s slice [c*P, (c+1)*P) of the epoch's sample sequence."""
    return take_samples(cycle_segments(sizes, order, consumer * per_consumer), per_consumer)


def resampled_segments(sizes: Sequence[int], seed: int, epoch: int, consumer: int) -> Iterator[Segment]:
    """Whole shards drawn with replacement, each with probability proportional to its size (so every
    sample is equally likely), without end."""
    rng = np.random.default_rng([seed, epoch, consumer, _RESAMPLE])
    weights = np.asarray(sizes, dtype=np.float64) / sum(sizes)
    while True:
        shard = int(rng.choice(len(sizes), p=weights))
        yield Segment(shard, 0, sizes[shard])


def shuffle_buffer_order(positions: Iterable[int], buffer_size: int, seed: int, epoch: int,
                         consumer: int) -> Iterator[int]:
    """The order in which a shuffle buffer of `buffer_size` emits a stream of read positions.

    Each emitted position was read at most `buffer_size` positions earlier, so a reader that keeps
    read-but-not-emitted samples holds at most `buffer_size` of them. The order depends only on the
    positions, never on the data, which lets a resumed epoch skip its first batches without reading them.
    """
    if buffer_size <= 1:
        yield from positions
        return
    rng = np.random.default_rng([seed, epoch, consumer, _SHUFFLE_BUFFER])
    buffer: list[int] = []
    for position in positions:
        buffer.append(position)
        if len(buffer) >= buffer_size:
            yield _pop_random(buffer, rng)
    while buffer:
        yield _pop_random(buffer, rng)


def _pop_random(buffer: list[int], rng: np.random.Generator) -> int:
    i = int(rng.integers(len(buffer)))
    buffer[i], buffer[-1] = buffer[-1], buffer[i]
    return buffer.pop()


def worker_skip_batches(skip_batches: int, worker: int, num_workers: int) -> int:
    """How many of the first `skip_batches` batches of a rank come from worker `worker`, given that the
    DataLoader takes batches from its workers in turn."""
    return len(range(worker, skip_batches, num_workers))
