"""The streaming loader: one IterableDataset that batches inside each dataloader worker, and `build_loader`.

Every consumer (rank, worker) yields exactly the planned number of batches, so every rank runs the same
number of steps and no collective waits forever. The batch order is a pure function of (seed, epoch):
the DataLoader takes batches from its workers in turn, and each worker's stream is fixed by the plan, so
`set_epoch(epoch, skip_batches=k)` resumes an epoch exactly at batch k without decoding the first k.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import math
import multiprocessing
import signal
from collections import Counter
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from emi.data.decode import SampleError, sample_rng, selection_rng
from emi.data.modes import MODES, PROMPT_MODES, WANTED, DecodeSpec, collate, decode_sample, entries_to_read
from emi.data.plan import (
    EpochShape,
    Segment,
    SourceShards,
    consumer_segments,
    consumers_of,
    cycle_segments,
    emission_order,
    epoch_length,
    epoch_runs,
    mixed_draw_weights,
    resampled_batches,
    resampled_segments,
    resampled_stretch_batches,
    samples_per_consumer,
    shuffle_buffer_order,
    stretch_steps,
    worker_batches,
    worker_skip_batches,
)
from emi.data.reader import RawSample, read_segments
from emi.data.urls import ShardInfo, ShardSet, resolve_shards
from emi.errors import UsageError
from emi.formats.checkpoint import Layout, Stretch

log = logging.getLogger(__name__)


MAX_STRETCHES = 64  # resumes under another layout within one epoch
_STRETCH_FIELDS = 5  # world_size, num_workers, batch_size, grad_accum, batches


class SharedEpoch:
    """The epoch, its earlier stretches (under other layouts), the batches of its current stretch to skip, and the
    count of skipped corrupt samples, in shared memory so that persistent workers see `set_epoch` and the main
    process sees their count."""

    def __init__(self, context: multiprocessing.context.BaseContext) -> None:
        self.epoch = context.Value("q", 0)
        self.skip_batches = context.Value("q", 0)
        self.skipped = context.Value("q", 0)
        self.num_stretches = context.Value("q", 0)
        self.stretch_fields = context.Array("q", _STRETCH_FIELDS * MAX_STRETCHES)

    def set_stretches(self, stretches: Sequence[Stretch]) -> None:
        if len(stretches) > MAX_STRETCHES:
            raise ValueError(f"{len(stretches)} resumes under another layout in one epoch: at most {MAX_STRETCHES}")
        for i, stretch in enumerate(stretches):
            layout = stretch.layout
            self.stretch_fields[_STRETCH_FIELDS * i : _STRETCH_FIELDS * (i + 1)] = [
                layout.world_size,
                layout.num_workers,
                layout.batch_size,
                layout.grad_accum,
                stretch.batches,
            ]
        self.num_stretches.value = len(stretches)

    def stretches(self) -> tuple[Stretch, ...]:
        fields = self.stretch_fields[: _STRETCH_FIELDS * self.num_stretches.value]
        return tuple(Stretch(Layout(*fields[i : i + 4]), fields[i + 4]) for i in range(0, len(fields), _STRETCH_FIELDS))


@dataclass(frozen=True)
class Sampling:
    """How an epoch is dealt out to the consumers (ranks x workers): every one gets the same number of batches."""

    batch_size: int
    world_size: int = 1
    rank: int = 0
    seed: int = 0  # the shard order, shuffle buffers and augmentation draw from (seed, epoch)
    shuffle: bool = False  # seeded shard order and a per-worker shuffle buffer
    resampled: bool = False  # each worker draws whole shards with replacement; an epoch is one data set's worth
    drop_last: bool = False  # no sample twice in an epoch (each consumer's share rounded down to whole batches)
    shuffle_buffer: int = 256


@dataclass(frozen=True)
class Workers:
    """The DataLoader's worker processes."""

    num_workers: int = 0
    pin_memory: bool | None = None  # None: on CUDA
    prefetch_factor: int = 2
    persistent_workers: bool = True
    start_method: str | None = None  # multiprocessing's (None: the platform default, fork on Linux)


@dataclass(frozen=True)
class LoaderSpec:
    """One rank's loader: what a sample becomes, how the epoch is dealt out, and the worker processes."""

    decode: DecodeSpec
    sampling: Sampling
    workers: Workers = Workers()


@dataclass(frozen=True)
class Source:
    """One data set of a Mix: its shards (a spec as build_loader takes one, or a ShardSet), its weight, its name (each
    batch's "source" names its samples' sources) and how its labels become prompts (None: the DecodeSpec's)."""

    name: str
    shards: str | Sequence[str] | ShardSet
    weight: float = 1.0
    prompt_fn: Callable[[dict], str] | None = None


@dataclass(frozen=True)
class Mix:
    """Several sources read together: an epoch of `epoch_samples` samples (0: as many as the sources hold together)
    takes from each source in proportion to its weight (emi.data.plan.epoch_runs)."""

    sources: tuple[Source, ...]
    epoch_samples: int = 0


@dataclass(frozen=True)
class SourcePlan:
    """What a ShardDataset knows of its sources: their shards and weights, names (empty: a plain data set, whose
    batches carry no "source"), decode specs, and the epoch's length (0: all the shards hold)."""

    shards: tuple[SourceShards, ...]
    names: tuple[str, ...]
    specs: tuple[DecodeSpec, ...]
    epoch_samples: int = 0


def workers_of(data: Any) -> Workers:
    """The worker settings of a run config's data section (emi.config.DataSection)."""
    return Workers(data.num_workers, data.pin_memory, data.prefetch_factor, data.persistent_workers)


class ShardDataset(IterableDataset):
    """Batches of one rank's share of the shards; in a worker, of that worker's share."""

    def __init__(
        self,
        shards: Sequence[ShardInfo],
        spec: DecodeSpec,
        shared: SharedEpoch,
        sampling: Sampling,
        num_workers: int,
        sources: SourcePlan | None = None,
    ) -> None:
        self.urls = [shard.url for shard in shards]
        self.sizes = [shard.num_samples for shard in shards]
        self.subsets = [shard.keys for shard in shards]  # a fold's keys per shard, None: all its samples
        self.spec, self.shared = spec, shared
        self.sources = sources or SourcePlan((SourceShards(tuple(range(len(shards))), 1.0),), (), (spec,))
        self.source_of = [0] * len(shards)  # each shard's source
        for index, source in enumerate(self.sources.shards):
            for shard in source.shards:
                self.source_of[shard] = index
        self.batch_size, self.rank, self.seed = sampling.batch_size, sampling.rank, sampling.seed
        self.shuffle, self.resampled = sampling.shuffle, sampling.resampled
        self.world_size, self.drop_last = sampling.world_size, sampling.drop_last
        self.shuffle_buffer = sampling.shuffle_buffer if sampling.shuffle else 0
        self.workers = max(1, num_workers)
        consumers = sampling.world_size * self.workers
        total = self.total = epoch_length(self.sizes, self.sources.epoch_samples)  # N: the samples of an epoch
        if sampling.resampled:
            self.per_consumer = resampled_batches(total, consumers, self.batch_size) * self.batch_size
        else:
            self.per_consumer = samples_per_consumer(total, consumers, self.batch_size, sampling.drop_last)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self.workers * self.per_consumer // self.batch_size

    def stretch_batches(self, epoch: int, stretches: Sequence[Stretch]) -> int:
        """Batches on this rank in the current stretch of an epoch whose earlier `stretches` ran under other layouts
        (all of the epoch's batches when there are none); the same for every epoch."""
        if not stretches:
            return len(self)
        if self.resampled:
            return resampled_stretch_batches(self.total, stretches, self.world_size, self.batch_size)
        return len(stretch_steps(self._shape(epoch), stretches, self.world_size, self.batch_size)[0])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        epoch, skip_batches, stretches = (
            self.shared.epoch.value,
            self.shared.skip_batches.value,
            self.shared.stretches(),
        )
        if stretches:
            samples, quota = self._stretch_samples(worker, epoch, skip_batches, stretches)
        else:
            # The DataLoader starts every epoch at worker 0; on resume at batch k, worker w continues the
            # stream that worker (w + k) % W had in the uninterrupted epoch, so batch k comes first.
            role = (worker + skip_batches) % self.workers
            consumer = self.rank * self.workers + role
            skip = worker_skip_batches(skip_batches, role, self.workers) * self.batch_size
            samples, quota = self._raw_samples(consumer, epoch, skip), self.per_consumer - skip
        try:
            yield from self._batches(samples, epoch, quota, f"rank {self.rank} worker {worker}")
        finally:
            samples.close()

    def _shape(self, epoch: int) -> EpochShape:
        return EpochShape((self.total,), self.seed, epoch, self.shuffle_buffer, self.drop_last)

    def _runs(self, epoch: int) -> list[Segment]:
        """The epoch's sample sequence, in runs (emi.data.plan.epoch_runs)."""
        return epoch_runs(self.sizes, self.sources.shards, self.sources.epoch_samples, self.seed, epoch, self.shuffle)

    def _draws(self, epoch: int, consumer: int, stretch: int = 0) -> Iterator[Segment]:
        """Resampled mode's shards, drawn by size, or in a mix by source weight and then by size."""
        weights = mixed_draw_weights(self.sizes, self.sources.shards) if len(self.sources.shards) > 1 else None
        return resampled_segments(self.sizes, self.seed, epoch, consumer, stretch, weights)

    def _stretch_samples(
        self, worker: int, epoch: int, skip_batches: int, stretches: Sequence[Stretch]
    ) -> tuple[Iterator[tuple[bool, RawSample | None]], int]:
        """(this worker's samples, how many it emits) in an epoch resumed under another layout (emi.data.plan)."""
        if self.resampled:  # fresh draws for what the epoch had left, from a stream of their own
            batches = resampled_stretch_batches(self.total, stretches, self.world_size, self.batch_size)
            quota = len(worker_batches(batches, worker, self.workers, skip_batches)) * self.batch_size
            consumer = self.rank * self.workers + worker
            segments = self._draws(epoch, consumer, stretch=len(stretches))
            reader = read_segments(
                self.urls, segments, (), WANTED[self.spec.mode], self._selection(epoch), subsets=self.subsets
            )
            return ((True, raw) for _, raw in reader), quota
        steps, repeats = stretch_steps(self._shape(epoch), stretches, self.world_size, self.batch_size)
        mine = list(worker_batches(len(steps), worker, self.workers, skip_batches))
        tickets, repeat = steps[mine, self.rank].reshape(-1), repeats[mine, self.rank].reshape(-1)
        first = stretches[0].layout
        per_consumer = samples_per_consumer(
            self.total, consumers_of(first.world_size, first.num_workers), first.batch_size, self.drop_last
        )
        return self._ticket_samples(tickets, repeat, per_consumer, epoch), len(tickets)

    def _ticket_samples(
        self, tickets: np.ndarray, repeats: np.ndarray, per_consumer: int, epoch: int
    ) -> Iterator[tuple[bool, RawSample | None]]:
        """(first place, sample) for each ticket in order, then make-up reads (emi.data.plan names the tickets).

        Ticket t is position t mod P of the slice of the first layout's consumer t // P. Each slice is read as a
        stream in its own emission order, from which the tickets take their samples in turn; where the tickets go
        back in a slice (a wrap-around), a new pass over it starts. So a worker holds at most a shuffle buffer of
        read-ahead samples per slice it draws from."""
        runs = self._runs(epoch)
        passes = _slice_passes(tickets, per_consumer, self._shape(epoch))
        left = Counter(stream for stream, _ in passes)
        wanted: dict[tuple[int, int], set[int]] = {}
        for stream, position in passes:
            wanted.setdefault(stream, set()).add(position)
        open_streams: dict[tuple[int, int], Iterator[tuple[int, RawSample | None]]] = {}
        try:
            for (stream, position), repeat in zip(passes, repeats):
                if stream not in open_streams:
                    open_streams[stream] = self._slice_stream(stream[0], epoch, runs, per_consumer, wanted[stream])
                read_position, raw = next(open_streams[stream])
                assert read_position == position, (stream, read_position, position)
                left[stream] -= 1
                if not left[stream]:
                    open_streams.pop(stream).close()
                yield not repeat, raw
        finally:
            for reader in open_streams.values():
                reader.close()
        yield from (
            (False, raw)
            for _, raw in read_segments(
                self.urls,
                cycle_segments(runs, 0),
                (),
                WANTED[self.spec.mode],
                self._selection(epoch),
                repeats_from=0,
                subsets=self.subsets,
            )
        )

    def _slice_stream(
        self, consumer: int, epoch: int, runs: Sequence[Segment], per_consumer: int, wanted: set[int]
    ) -> Iterator[tuple[int, RawSample | None]]:
        """(position, sample) for the `wanted` positions of a consumer's slice, in its emission order."""
        segments = consumer_segments(runs, consumer, per_consumer)
        emission = shuffle_buffer_order(range(per_consumer), self.shuffle_buffer, self.seed, epoch, consumer)
        return self._in_emission_order(
            segments,
            (p for p in emission if p in wanted),
            _Unwanted(wanted),
            self.total - consumer * per_consumer,
            epoch,
        )

    def _raw_samples(self, consumer: int, epoch: int, skip: int) -> Iterator[tuple[bool, RawSample | None]]:
        """This consumer's samples in emission order after the first `skip`, then, to make up for
        corrupt ones, its slice again and the rest of the data set (None: a sample that could not be read).

        Each comes with whether it is its sample's first place in the epoch: the plan wraps around to the start
        to fill the last slices, and the make-up reads come round to samples met before. Only first places count
        (and name) an unusable sample, so each is reported once per epoch, by the consumer whose slice holds it."""
        if self.resampled:  # every draw is a sample of its own
            segments = self._draws(epoch, consumer)
            positions: Iterator[int] = itertools.count()
            repeats_from = math.inf
        else:
            runs = self._runs(epoch)
            segments = consumer_segments(runs, consumer, self.per_consumer)
            positions = iter(range(self.per_consumer))
            repeats_from = self.total - consumer * self.per_consumer  # the wrap-around part of the slice
        emission = shuffle_buffer_order(positions, self.shuffle_buffer, self.seed, epoch, consumer)
        skipped = set(itertools.islice(emission, skip))
        for position, raw in self._in_emission_order(segments, emission, skipped, repeats_from, epoch):
            yield position < repeats_from, raw
        if not self.resampled:
            begin = consumer * self.per_consumer
            yield from (
                (False, raw)
                for _, raw in read_segments(
                    self.urls,
                    cycle_segments(runs, begin),
                    (),
                    WANTED[self.spec.mode],
                    self._selection(epoch),
                    repeats_from=0,
                    subsets=self.subsets,
                )
            )

    def _in_emission_order(
        self,
        segments: Iterable[Segment],
        emission: Iterable[int],
        unread: Container[int],
        repeats_from: float,
        epoch: int,
    ) -> Iterator[tuple[int, RawSample | None]]:
        """(position, sample) for each position of `emission`, reading `segments` in plan order, all but the
        positions in `unread` (None: a sample that could not be read)."""
        reader = read_segments(
            self.urls,
            segments,
            unread,
            WANTED[self.spec.mode],
            self._selection(epoch),
            repeats_from=repeats_from,
            subsets=self.subsets,
        )
        pending: dict[int, RawSample | None] = {}  # read but not yet emitted: at most shuffle_buffer
        try:
            for position in emission:
                while position not in pending:
                    read_position, raw = next(reader)
                    pending[read_position] = raw
                yield position, pending.pop(position)
        finally:
            reader.close()

    def _selection(self, epoch: int) -> Callable[[str, list[str]], set[str]]:
        """Which entries of a sample to read: only the frames decoding uses (emi.data.modes.entries_to_read)."""
        return lambda key, extensions: entries_to_read(extensions, self.spec, selection_rng(self.seed, epoch, key))

    def _batches(
        self, samples: Iterator[tuple[bool, RawSample | None]], epoch: int, quota: int, who: str
    ) -> Iterator[dict[str, Any]]:
        batch: list[dict[str, Any]] = []
        emitted = skipped = failures_in_a_row = 0
        total = sum(self.sizes)
        while emitted < quota:
            first_place, raw = next(samples)
            sample = self._decode(raw, epoch, warn=first_place)
            if sample is None:
                failures_in_a_row += 1
                if first_place:
                    skipped += 1
                    with self.shared.skipped.get_lock():
                        self.shared.skipped.value += 1
                if failures_in_a_row >= total:
                    raise UsageError(
                        f"{who}: {total} samples in a row were unusable, as many as the "
                        f"data set holds ({len(self.urls)} shards from {self.urls[0]}): "
                        f"no valid sample to train on (see the warnings above)"
                    )
                continue
            failures_in_a_row = 0
            batch.append(sample)
            if len(batch) == self.batch_size:
                out = collate(batch, self.spec)
                out["num_skipped"] = skipped
                batch = []
                emitted += self.batch_size
                yield out
        if skipped:
            log.warning("%s: skipped %d corrupt samples this epoch (see warnings above)", who, skipped)

    def _decode(self, raw: RawSample | None, epoch: int, warn: bool) -> dict[str, Any] | None:
        if raw is None:  # unreadable; the reader has said why
            return None
        source = self.source_of[raw.shard]
        try:
            sample = decode_sample(raw, self.sources.specs[source], sample_rng(self.seed, epoch, raw.key))
        except SampleError as err:
            (log.warning if warn else log.debug)("shard %s: skipping sample %r: %s", raw.url, raw.key, err)
            return None
        if self.sources.names:
            sample["source"] = self.sources.names[source]
        return sample


class _Unwanted:
    """The positions a reader passes over: all but the wanted ones."""

    def __init__(self, wanted: set[int]) -> None:
        self.wanted = wanted

    def __contains__(self, position: object) -> bool:
        return position not in self.wanted


def _slice_passes(tickets: np.ndarray, per_consumer: int, shape: EpochShape) -> list[tuple[tuple[int, int], int]]:
    """((first-layout consumer, pass over its slice), position in the slice) for each ticket: a new pass whenever
    the tickets go back in the slice's emission order."""
    inverse: dict[int, np.ndarray] = {}  # consumer -> each position's place in its emission order
    last: dict[int, tuple[int, int]] = {}  # consumer -> (its pass, the place of its last ticket)
    passes = []
    for ticket in tickets.tolist():
        consumer, position = divmod(ticket, per_consumer)
        if consumer not in inverse:
            emitted = emission_order(shape, consumer, per_consumer)
            inverse[consumer] = np.empty_like(emitted)
            inverse[consumer][emitted] = np.arange(per_consumer)
        place = int(inverse[consumer][position])
        count, previous = last.get(consumer, (0, -1))
        count += place <= previous
        last[consumer] = (count, place)
        passes.append(((consumer, count), position))
    return passes


@dataclass
class DataInfo:
    """A loader for training: call `set_epoch` before iterating `dataloader` each epoch.

    num_batches: batches per epoch on each rank (the same on every rank).
    num_samples: samples per epoch on all ranks together (num_batches x batch_size x world_size).
    """

    dataloader: DataLoader
    dataset: ShardDataset
    num_batches: int
    num_samples: int

    def set_epoch(self, epoch: int, skip_batches: int = 0, stretches: Sequence[Stretch] = ()) -> None:
        """Select the epoch's plan; with `skip_batches` = k the epoch yields its batches k.. only
        (num_batches - k of them), identical to those of the uninterrupted epoch.

        `stretches`: the epoch's earlier parts, run under other layouts (processes, workers, batch size), each
        with the batches every rank consumed in it. The samples they left are dealt out again to this loader's
        ranks (emi.data.plan): the epoch then yields `stretch_batches(stretches)` batches, from batch k on."""
        batches = self.stretch_batches(stretches)
        if epoch < 0 or not 0 <= skip_batches <= batches:
            raise ValueError(
                f"set_epoch({epoch}, skip_batches={skip_batches}): need epoch >= 0 and "
                f"0 <= skip_batches <= the epoch's batches ({batches})"
            )
        shared = self.dataset.shared
        shared.set_stretches(stretches)
        shared.epoch.value, shared.skip_batches.value, shared.skipped.value = epoch, skip_batches, 0

    def stretch_batches(self, stretches: Sequence[Stretch] = ()) -> int:
        """Batches on each rank in what is left of an epoch after `stretches` (all of them: num_batches)."""
        return self.dataset.stretch_batches(0, stretches)

    def skipped(self) -> int:
        """Corrupt or unreadable samples this rank skipped so far in the current epoch."""
        return self.dataset.shared.skipped.value


def build_loader(
    shards: str | Sequence[str] | ShardSet | Mix, spec: LoaderSpec, manifest: str | Path | None = None
) -> DataInfo:
    """A DataLoader over WebDataset shards for one rank: a shard spec (emi.data.urls: a folder, a pattern, a URL, a
    `::` list; `manifest` for shards with none beside them), a resolved ShardSet, or a Mix of several."""
    decode, sampling, workers = spec.decode, spec.sampling, spec.workers
    if decode.mode not in MODES:
        raise ValueError(f"mode {decode.mode!r}: expected one of {', '.join(MODES)}")
    if decode.mode in PROMPT_MODES and decode.prompt_fn is None:
        raise ValueError(f"mode {decode.mode!r} needs a prompt_fn(labels) -> str")
    if (
        sampling.batch_size < 1
        or workers.num_workers < 0
        or sampling.seed < 0
        or decode.num_frames < 0
        or not 0 <= sampling.rank < sampling.world_size
    ):
        raise ValueError(f"bad loader settings: {spec}")
    context = multiprocessing.get_context(workers.start_method)
    if isinstance(shards, Mix):
        resolved, sources = mixed_shards(shards, decode, manifest)
    else:
        resolved, sources = resolve_shards(shards, manifest).shards, None
    dataset = ShardDataset(resolved, decode, SharedEpoch(context), sampling, workers.num_workers, sources)
    parallel = workers.num_workers > 0
    dataloader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers.num_workers,
        pin_memory=torch.cuda.is_available() if workers.pin_memory is None else workers.pin_memory,
        persistent_workers=workers.persistent_workers and parallel,
        prefetch_factor=workers.prefetch_factor if parallel else None,
        worker_init_fn=_init_worker,
        multiprocessing_context=context if parallel else None,
        # Its own generator: starting workers must not draw from the global RNG, or a resumed run's dropout
        # would drift from the uninterrupted run's (all randomness in the data comes from seed/epoch/key).
        generator=torch.Generator().manual_seed(sampling.seed),
    )
    num_batches = len(dataset)
    return DataInfo(dataloader, dataset, num_batches, num_batches * sampling.batch_size * sampling.world_size)


def mixed_shards(mix: Mix, decode: DecodeSpec, manifest: str | Path | None) -> tuple[list[ShardInfo], SourcePlan]:
    """All the sources' shards laid end to end, and the plan of which are whose."""
    if not mix.sources or mix.epoch_samples < 0 or min(source.weight for source in mix.sources) <= 0:
        raise ValueError(f"a mix needs sources with weights > 0 and epoch_samples >= 0: {mix}")
    shards: list[ShardInfo] = []
    plans = []
    for source in mix.sources:
        resolved = resolve_shards(source.shards, manifest).shards
        plans.append(SourceShards(tuple(range(len(shards), len(shards) + len(resolved))), source.weight))
        shards += resolved
    specs = tuple(replace(decode, prompt_fn=source.prompt_fn or decode.prompt_fn) for source in mix.sources)
    names = tuple(source.name for source in mix.sources)
    return shards, SourcePlan(tuple(plans), names, specs, mix.epoch_samples)


def _init_worker(worker_id: int) -> None:
    # Decoding is parallel across workers already; threads inside each would oversubscribe the cores.
    torch.set_num_threads(1)
    # Slurm signals every process of a job; the trainer turns SIGTERM/SIGUSR1 into a checkpoint, which needs its
    # workers alive until it has saved (a worker killed by SIGTERM would crash the main process first).
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


@atexit.register
def _kill_workers_at_exit() -> None:
    """At exit multiprocessing terminates (SIGTERM) daemonic children, then joins them: workers ignoring SIGTERM
    would hang the exit of a process that fails mid-epoch. Runs before multiprocessing's own exit hook (LIFO)."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
