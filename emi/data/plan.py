"""Epoch planning: which samples each consumer (rank, dataloader worker) reads, in which order.

An epoch is a sequence of runs (Segments: samples of one shard); from one data set, its shards whole in a
(seeded) shard order; from a mix of sources, chunks of each source's share interleaved in proportion
(`epoch_runs`). Consumer c reads the contiguous slice [c*P, (c+1)*P) of that sequence, wrapping to its start for
the few samples past the end. P is the same for every consumer, so every rank yields the same number of batches.
Everything here is a pure function of (sizes, sources, seed, epoch, consumer): the plan is the same in every
process and after a restart.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from emi.formats.checkpoint import Stretch

# Distinct seed streams for the separate random choices of one (seed, epoch).
_SHARD_ORDER, _SHUFFLE_BUFFER, _RESAMPLE, _SOURCE_PASS = 0, 1, 2, 3
# A mixed epoch interleaves its sources in runs of at most this many samples: consumers read contiguous slices of
# the epoch, so a shorter run mixes each consumer's stream (and with the shuffle buffer, each batch) more finely,
# and a longer one opens fewer shards (each run is read from its own opening of the shard).
MIX_RUN = 32


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
            raise ValueError(
                f"{num_samples} samples cannot give each of {consumers} consumers "
                f"(ranks x workers) a full batch of {batch_size} with drop_last=True"
            )
        return per_consumer
    return math.ceil(math.ceil(num_samples / consumers) / batch_size) * batch_size


def resampled_batches(num_samples: int, consumers: int, batch_size: int) -> int:
    """Batches per consumer per epoch in resampled mode: one pass over the data set between all of them."""
    return math.ceil(num_samples / (consumers * batch_size))


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(num_shards))
    return np.random.default_rng([seed, epoch, _SHARD_ORDER]).permutation(num_shards).tolist()


@dataclass(frozen=True)
class SourceShards:
    """One source of a mix: its shards (indices into the loader's shards, all sources' shards laid end to end) and
    its weight."""

    shards: tuple[int, ...]
    weight: float


def source_shares(weights: Sequence[float], epoch_samples: int) -> list[int]:
    """n_i: the samples each source gives an epoch of `epoch_samples`, proportional to its weight, rounded by largest
    remainder (ties to the first source) so that they add up to `epoch_samples`."""
    total = sum(weights)
    exact = [epoch_samples * weight / total for weight in weights]
    shares = [math.floor(share) for share in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in by_remainder[: epoch_samples - sum(shares)]:
        shares[i] += 1
    return shares


def source_pass(
    sizes: Sequence[int], source: SourceShards, index: int, seed: int, pass_: int, shuffle: bool
) -> list[int]:
    """The shards of source number `index` in the order of its pass `pass_` over them (seeded by source and pass)."""
    shards = [shard for shard in source.shards if sizes[shard] > 0]
    if not shuffle:
        return shards
    order = np.random.default_rng([seed, _SOURCE_PASS, index, pass_]).permutation(len(shards))
    return [shards[i] for i in order.tolist()]


def source_take(
    sizes: Sequence[int], source: SourceShards, index: int, seed: int, begin: int, count: int, shuffle: bool
) -> list[Segment]:
    """Positions [begin, begin + count) of a source's endless sequence of passes (each pass its shards whole in a
    seeded order), in runs of at most MIX_RUN samples within one shard."""
    total = sum(sizes[shard] for shard in source.shards)
    runs: list[Segment] = []
    pass_, offset = divmod(begin, total)
    while count > 0:
        order = source_pass(sizes, source, index, seed, pass_, shuffle)
        for segment in take_samples(cycle_segments(whole_shards(sizes, order), offset), min(count, total - offset)):
            runs += [
                Segment(segment.shard, start, min(start + MIX_RUN, segment.stop))
                for start in range(segment.start, segment.stop, MIX_RUN)
            ]
        count -= total - offset
        pass_, offset = pass_ + 1, 0
    return runs


def epoch_runs(
    sizes: Sequence[int], sources: Sequence[SourceShards], epoch_samples: int, seed: int, epoch: int, shuffle: bool
) -> list[Segment]:
    """The runs of epoch `epoch`, laid end to end: its sample sequence.

    One source and epoch_samples 0: every shard whole, in shard_order. Otherwise source i gives positions
    [e*n_i, (e+1)*n_i) of its endless sequence of passes (`source_shares`, `source_take`): a source smaller than
    its share wraps into its next pass, a larger one goes on next epoch where this one stopped. The sources' runs
    are merged in proportion: each run takes its place by where its middle lies in its source's share."""
    if len(sources) == 1 and not epoch_samples:
        return whole_shards(sizes, shard_order(len(sizes), seed, epoch, shuffle))
    shares = source_shares([source.weight for source in sources], epoch_length(sizes, epoch_samples))
    placed = []
    for index, (source, share) in enumerate(zip(sources, shares)):
        offset = 0
        for run in source_take(sizes, source, index, seed, epoch * share, share, shuffle):
            length = run.stop - run.start
            placed.append(((2 * offset + length) / (2 * share), index, run))
            offset += length
    placed.sort(key=lambda place: place[:2])
    return [run for _, _, run in placed]


def epoch_length(sizes: Sequence[int], epoch_samples: int) -> int:
    """N: the samples of an epoch, `epoch_samples` or else (0) all the shards hold."""
    return epoch_samples or sum(sizes)


def mixed_draw_weights(sizes: Sequence[int], sources: Sequence[SourceShards]) -> list[float]:
    """Resampled mode's weight of each shard in a mix: within a source, by size (as with one data set), and across
    sources so that each gives samples in proportion to its weight, whatever its shards' sizes (a draw reads its
    shard whole, so a source of larger shards is drawn less often)."""
    weights = [0.0] * len(sizes)
    for source in sources:
        squares = sum(sizes[shard] ** 2 for shard in source.shards)
        for shard in source.shards:
            weights[shard] += source.weight * sizes[shard] / squares
    return weights


def whole_shards(sizes: Sequence[int], order: Sequence[int]) -> list[Segment]:
    """The runs of an epoch that reads every shard whole, in `order`."""
    return [Segment(shard, 0, sizes[shard]) for shard in order]


def cycle_segments(runs: Sequence[Segment], begin: int) -> Iterator[Segment]:
    """The epoch's sample sequence (its `runs` laid end to end) from position `begin`, repeated without end."""
    runs = [run for run in runs if run.stop > run.start]
    starts = list(itertools.accumulate((run.stop - run.start for run in runs), initial=0))
    total = starts.pop()
    position = begin % total
    k = bisect.bisect_right(starts, position) - 1
    yield Segment(runs[k].shard, runs[k].start + position - starts[k], runs[k].stop)
    while True:
        k = (k + 1) % len(runs)
        yield runs[k]


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


def consumer_segments(runs: Sequence[Segment], consumer: int, per_consumer: int) -> list[Segment]:
    """Consumer `consumer`'s slice [c*P, (c+1)*P) of the epoch's sample sequence (its `runs` laid end to end)."""
    return take_samples(cycle_segments(runs, consumer * per_consumer), per_consumer)


def resampled_segments(
    sizes: Sequence[int],
    seed: int,
    epoch: int,
    consumer: int,
    stretch: int = 0,
    draw_weights: Sequence[float] | None = None,
) -> Iterator[Segment]:
    """Whole shards drawn with replacement, each with probability proportional to its size (so every
    sample is equally likely), or to `draw_weights` (a mix: `mixed_draw_weights`), without end; `stretch` > 0
    draws afresh for the part of an epoch resumed under another layout."""
    rng = np.random.default_rng([seed, epoch, consumer, _RESAMPLE, *([stretch] if stretch else [])])
    weights = np.asarray(sizes if draw_weights is None else draw_weights, dtype=np.float64)
    weights = weights / weights.sum()
    while True:
        shard = int(rng.choice(len(sizes), p=weights))
        yield Segment(shard, 0, sizes[shard])


def shuffle_buffer_order(
    positions: Iterable[int], buffer_size: int, seed: int, epoch: int, consumer: int
) -> Iterator[int]:
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


# --- Resuming an epoch under another layout (processes, workers, batch size) --------------------------------------
#
# A sample of the epoch is named by its ticket: its index in the sequence of all the epoch's samples as the epoch's
# first layout dealt them, consumer c's slice being tickets [c*P, (c+1)*P) (a ticket t reads sample t mod N; tickets
# past N are the wrap-around that fills the last slices). Under a layout, micro-step j of the epoch is batch j of
# every rank: a (ranks, batch) block of tickets. A resume under another layout takes the micro-steps not yet
# consumed, lays their tickets end to end in order, and deals them out again as micro-steps of the new layout: so
# every sample the interrupted epoch had left is read exactly once, every rank gets the same number of batches, and
# an optimizer step whose global batch is kept holds exactly the samples it would have held.


@dataclass(frozen=True)
class EpochShape:
    """What fixes an epoch's tickets besides the layouts: the epoch's length and the sampling settings."""

    sizes: tuple[int, ...]  # sample counts that add up to the epoch's length N (its runs' lengths will do)
    seed: int
    epoch: int
    shuffle_buffer: int  # 0: no shuffle buffer
    drop_last: bool

    @property
    def total(self) -> int:
        return sum(self.sizes)


def consumers_of(world_size: int, num_workers: int) -> int:
    return world_size * max(1, num_workers)


def emission_order(shape: EpochShape, consumer: int, per_consumer: int) -> np.ndarray:
    """The read positions (0..P-1) of consumer `consumer`'s slice in the order its shuffle buffer emits them."""
    order = shuffle_buffer_order(range(per_consumer), shape.shuffle_buffer, shape.seed, shape.epoch, consumer)
    return np.fromiter(order, dtype=np.int64, count=per_consumer)


def first_stretch_steps(shape: EpochShape, world_size: int, num_workers: int, batch_size: int) -> np.ndarray:
    """The epoch's micro-steps under its first layout: tickets of shape (batches per rank, ranks, batch size).

    Rank r's batch j comes from its worker j mod W (the DataLoader takes batches from its workers in turn), whose
    consumer r*W + j mod W emits it as its batch j // W."""
    workers = max(1, num_workers)
    per_consumer = samples_per_consumer(shape.total, world_size * workers, batch_size, shape.drop_last)
    batches_per_consumer = per_consumer // batch_size
    steps = np.empty((workers * batches_per_consumer, world_size, batch_size), dtype=np.int64)
    for rank in range(world_size):
        for worker in range(workers):
            consumer = rank * workers + worker
            emitted = consumer * per_consumer + emission_order(shape, consumer, per_consumer)
            steps[worker::workers, rank, :] = emitted.reshape(batches_per_consumer, batch_size)
    return steps


def redeal(
    tickets: np.ndarray, repeats: np.ndarray, world_size: int, batch_size: int, drop_last: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Tickets laid end to end, dealt as micro-steps of (ranks, batch size): (steps, whether each ticket is a repeat).

    The last micro-step is filled by wrapping around to the first tickets (repeats), or with drop_last the tickets
    that cannot fill one are left out."""
    per_step = world_size * batch_size
    count = len(tickets) // per_step if drop_last else -(-len(tickets) // per_step)
    index = np.arange(count * per_step)
    wrapped = index % max(1, len(tickets))
    shape = (count, world_size, batch_size)
    return tickets[wrapped].reshape(shape), (repeats[wrapped] | (index >= len(tickets))).reshape(shape)


def usable_batches(batches: int, grad_accum: int) -> int:
    """The micro-batches of a stretch that fill whole optimizer steps (the trainer leaves the rest unused)."""
    return batches // grad_accum * grad_accum


def stretch_steps(
    shape: EpochShape, stretches: Sequence[Stretch], world_size: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The micro-steps of the epoch's current stretch, on `world_size` ranks in batches of `batch_size`, after the
    earlier `stretches` (each a layout and the batches each rank consumed under it): tickets (batches per rank,
    ranks, batch size) and whether each is a repeat (the wrap-around of a slice or of a re-deal, already read in
    this epoch)."""
    first = stretches[0].layout
    steps = first_stretch_steps(shape, first.world_size, first.num_workers, first.batch_size)
    repeats = steps >= shape.total
    following = [(s.layout.world_size, s.layout.batch_size) for s in stretches[1:]] + [(world_size, batch_size)]
    for stretch, (ranks, batch) in zip(stretches, following):
        end = usable_batches(len(steps), stretch.layout.grad_accum)
        left, left_repeats = steps[stretch.batches : end].reshape(-1), repeats[stretch.batches : end].reshape(-1)
        steps, repeats = redeal(left, left_repeats, ranks, batch, shape.drop_last)
    return steps, repeats


def resampled_stretch_batches(total: int, stretches: Sequence[Stretch], world_size: int, batch_size: int) -> int:
    """Batches per rank of the current stretch in resampled mode: the samples the epoch had left, in batches of the
    current layout (each worker draws them afresh)."""
    first = stretches[0].layout
    batches = max(1, first.num_workers) * resampled_batches(
        total, consumers_of(first.world_size, first.num_workers), first.batch_size
    )
    following = [(s.layout.world_size, s.layout.batch_size) for s in stretches[1:]] + [(world_size, batch_size)]
    for stretch, (ranks, batch) in zip(stretches, following):
        left = (usable_batches(batches, stretch.layout.grad_accum) - stretch.batches) * (
            stretch.layout.world_size * stretch.layout.batch_size
        )
        batches = -(-left // (ranks * batch))
    return batches


def worker_batches(batches: int, worker: int, num_workers: int, skip_batches: int) -> range:
    """The batches of a rank (numbers 0..batches-1) that worker `worker` yields after the first `skip_batches`: the
    DataLoader takes batches from its workers in turn, starting at worker 0, so batch skip_batches + i comes from
    worker i mod W."""
    return range(skip_batches + worker, batches, max(1, num_workers))
