"""An epoch resumed under another layout (processes, workers, batch size): the samples it had left are dealt out again,
each read exactly once, in equal batches per rank; and with the global batch kept, each micro-step holds the samples
it would have held."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest

from emi.data.plan import EpochShape, stretch_steps
from emi.formats.checkpoint import Layout, Stretch

from helpers import layout_loader, write_shards

SIZES = [13, 17, 18]  # 48 samples


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("resize")
    keys = write_shards(out, SIZES, frames=(3, 4), size=(32, 24))
    return out, [key for shard in keys for key in shard]


def rank_batches(folder: Path, layout: Layout, rank: int, epoch: int, stretches=(), skip: int = 0) -> list[list[str]]:
    """The keys of each batch rank `rank` of `layout` yields in the epoch (after `stretches`, from batch `skip`)."""
    data = layout_loader(str(folder), layout, rank)
    data.set_epoch(epoch, skip_batches=skip, stretches=stretches)
    batches = [batch["key"] for batch in data.dataloader]
    assert len(batches) == data.stretch_batches(stretches) - skip
    return batches


def micro_steps(folder: Path, layout: Layout, epoch: int, stretches=(), skip: int = 0) -> list[list[str]]:
    """Micro-step j: the keys of batch j of every rank, rank after rank."""
    per_rank = [rank_batches(folder, layout, rank, epoch, stretches, skip) for rank in range(layout.world_size)]
    assert len({len(batches) for batches in per_rank}) == 1, "ranks with unequal batch counts"
    return [list(itertools.chain(*step)) for step in zip(*per_rank)]


def test_an_epoch_resumed_on_three_ranks_then_one_reads_every_sample_exactly_once(shards):
    """2 ranks x 2 workers in batches of 3 consume 2 batches each; 3 ranks x 1 worker in batches of 2 consume 3; one
    rank with 2 workers in batches of 3 finishes the epoch: every one of the 48 samples once."""
    folder, keys = shards
    first, second, third = Layout(2, 2, 3, 1), Layout(3, 1, 2, 1), Layout(1, 2, 3, 1)
    seen = Counter()
    steps = micro_steps(folder, first, epoch=1)
    assert len(steps) == 8 and all(len(step) == 6 for step in steps)
    seen.update(itertools.chain(*steps[:2]))
    stretches = [Stretch(first, 2)]
    steps = micro_steps(folder, second, 1, stretches)
    assert len(steps) == 6  # the 36 samples left, 6 per micro-step
    seen.update(itertools.chain(*steps[:3]))
    stretches.append(Stretch(second, 3))
    steps = micro_steps(folder, third, 1, stretches)
    assert len(steps) == 6  # the 18 left, in batches of 3
    seen.update(itertools.chain(*steps))
    assert seen == Counter(keys)


def test_a_resume_within_a_resumed_stretch_yields_its_remaining_batches(shards):
    """A same-layout resume at batch k of a re-dealt stretch continues it exactly (workers take turns as before)."""
    folder, _ = shards
    stretches = [Stretch(Layout(2, 2, 3, 1), 3)]
    full = rank_batches(folder, Layout(3, 2, 2, 1), 1, 0, stretches)
    assert rank_batches(folder, Layout(3, 2, 2, 1), 1, 0, stretches, skip=3) == full[3:]


def test_with_the_global_batch_kept_each_micro_step_holds_the_samples_it_would_have(shards):
    """2 ranks x batch 3 resumed on one rank x batch 6 (train.resize=batch): micro-step j of the resumed epoch has the
    samples of micro-step j of the uninterrupted epoch."""
    folder, _ = shards
    two = Layout(2, 2, 3, 1)
    uninterrupted = micro_steps(folder, two, epoch=2)
    resumed = micro_steps(folder, Layout(1, 1, 6, 1), 2, [Stretch(two, 3)])
    assert [sorted(step) for step in resumed] == [sorted(step) for step in uninterrupted[3:]]


def test_grad_accumulation_leftovers_are_not_dealt_out_again():
    """The trainer uses whole optimizer steps of a stretch only; the micro-batches past the last are never trained,
    so a re-deal leaves them out as the uninterrupted epoch would."""
    shape = EpochShape((10, 11), seed=1, epoch=0, shuffle_buffer=0, drop_last=True)
    accumulating = Layout(1, 1, 2, 4)  # 10 batches: 8 trained in 2 steps, 2 left over
    steps, repeats = stretch_steps(shape, [Stretch(accumulating, 4)], 2, 2)
    assert steps.shape == (2, 2, 2) and not repeats.any()  # batches 4..7: 8 samples, 4 per step on 2 ranks


def test_without_drop_last_the_last_step_is_filled_with_marked_repeats():
    """13 samples in 7 batches of 2 (the 14th place wraps round to a sample read before), 2 batches consumed: the 9
    samples left come once each in 3 micro-steps of 2 ranks x 2, the other 3 places marked as repeats."""
    shape = EpochShape((7, 6), seed=1, epoch=0, shuffle_buffer=4, drop_last=False)
    first = Layout(1, 1, 2, 1)
    steps, repeats = stretch_steps(shape, [Stretch(first, 2)], 2, 2)
    consumed = stretch_steps(shape, [Stretch(first, 0)], 1, 2)[0][:2].reshape(-1)
    fresh = steps[~repeats].tolist()
    assert steps.shape == (3, 2, 2) and len(fresh) == len(set(fresh)) == 9
    assert sorted(fresh + consumed.tolist()) == list(range(13))
