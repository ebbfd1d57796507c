"""Stage I on a weighted mix of data sets: each epoch takes from each source in proportion to its weight, every sample
of a source at most once per pass over it, and the mixed epoch resumes exactly, mid-epoch and on another layout."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest
import torch

from emi.config import Stage1Config, build_config
from emi.data import ImageSpec, Mix, Source
from emi.data.plan import (
    MIX_RUN,
    SourceShards,
    epoch_runs,
    mixed_draw_weights,
    resampled_segments,
    shard_order,
    source_shares,
    whole_shards,
)
from emi.engine.telemetry import SourceCounts
from emi.errors import UsageError
from emi.formats.checkpoint import Layout, Stretch
from emi.models.losses import va_confidence_weights
from emi.prompts import build_prompt
from emi.stages.stage1 import train_shards

from helpers import assert_same_batches, flat_loader, launch, layout_loader, scalars, write_shards

SIZES_A, SIZES_B = [13, 17, 18], [5, 7]  # 48 and 12 samples
SIZES = SIZES_A + SIZES_B
SOURCES = (SourceShards((0, 1, 2), 3.0), SourceShards((3, 4), 1.0))
ONE_RANK = Layout(1, 2, 4, 1)  # one rank with 2 workers in batches of 4


def expand(runs) -> list[tuple[int, int]]:
    return [(run.shard, i) for run in runs for i in range(run.start, run.stop)]


def source_of(shard: int) -> int:
    return 0 if shard < len(SIZES_A) else 1


# ------------------------------------------------------------------------------------------------ the plan


def test_shares_follow_the_weights_by_largest_remainder():
    assert source_shares([3, 1], 48) == [36, 12]
    assert source_shares([1, 1, 1], 10) == [4, 3, 3]
    assert source_shares([2, 1], 10) == [7, 3]
    assert source_shares([0.5, 0.25, 0.25], 7) == [3, 2, 2]  # 3.5, 1.75, 1.75
    assert all(sum(source_shares([3, 2, 0.7], n)) == n for n in range(50))


@pytest.mark.parametrize("epoch_samples", [0, 40, 100])
def test_an_epoch_takes_from_each_source_in_proportion_and_interleaves_them(epoch_samples):
    total = epoch_samples or sum(SIZES)
    want = source_shares([3, 1], total)
    for epoch in range(3):
        samples = expand(epoch_runs(SIZES, SOURCES, epoch_samples, seed=4, epoch=epoch, shuffle=True))
        sources = [source_of(shard) for shard, _ in samples]
        assert len(samples) == total and [sources.count(0), sources.count(1)] == want
        # in proportion all along the sequence, not one source after the other: every prefix within about a run
        for end in range(1, total + 1):
            assert abs(sources[:end].count(1) - end * want[1] / total) <= MIX_RUN + 1


def test_runs_are_short_pieces_of_one_shard():
    runs = epoch_runs(SIZES, SOURCES, 0, seed=4, epoch=0, shuffle=True)
    assert all(0 < run.stop - run.start <= MIX_RUN and run.stop <= SIZES[run.shard] for run in runs)


def test_every_sample_of_a_source_comes_once_per_pass_as_the_small_one_wraps():
    """Source B (12 samples) gives 15 of every 60; source A (48) gives 45: B wraps within an epoch, A goes on in
    the next epoch where it stopped. Laid end to end over the epochs, each source's takes are its passes."""
    taken: dict[int, list[tuple[int, int]]] = {0: [], 1: []}
    for epoch in range(5):
        samples = expand(epoch_runs(SIZES, SOURCES, 0, seed=4, epoch=epoch, shuffle=True))
        for source in (0, 1):  # in the order of the source's sequence: by place within the epoch
            taken[source] += [sample for sample in samples if source_of(sample[0]) == source]
    for source in (0, 1):
        everything = sorted((shard, i) for shard in SOURCES[source].shards for i in range(SIZES[shard]))
        total = len(everything)
        passes = [taken[source][k : k + total] for k in range(0, len(taken[source]), total)]
        assert len(passes) >= 5
        for one_pass in passes:
            assert len(set(one_pass)) == len(one_pass)  # at most once in a pass (the last may be partial)
        assert all(sorted(one_pass) == everything for one_pass in passes[:-1])
        assert len({tuple(one_pass) for one_pass in passes[:-1]}) > 1  # each pass in its own seeded order


def test_one_source_keeps_the_plain_epoch():
    sizes, one = [5, 0, 9, 4], (SourceShards((0, 1, 2, 3), 1.0),)
    for epoch in range(3):
        plain = whole_shards(sizes, shard_order(len(sizes), 7, epoch, True))
        assert epoch_runs(sizes, one, 0, seed=7, epoch=epoch, shuffle=True) == plain


def test_resampled_mix_gives_samples_by_weight_and_draws_shards_by_size():
    weights = mixed_draw_weights(SIZES, SOURCES)
    assert weights[1] / weights[0] == pytest.approx(17 / 13) and weights[4] / weights[3] == pytest.approx(7 / 5)
    # the samples a draw gives, expected per source: in proportion to the weights
    expected = [sum(weights[s] * SIZES[s] for s in source.shards) for source in SOURCES]
    assert expected[0] / expected[1] == pytest.approx(3.0)
    draws = [s.shard for s in itertools.islice(resampled_segments(SIZES, 0, 0, 0, draw_weights=weights), 4000)]
    samples = Counter()
    for shard in draws:
        samples[source_of(shard)] += SIZES[shard]
    assert 0.72 < samples[0] / sum(samples.values()) < 0.78


# ---------------------------------------------------------------------------------------------- the loader


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("mix")
    write_shards(out / "a", SIZES_A, frames=(3, 4), size=(32, 24), key_prefix="a")
    write_shards(out / "b", SIZES_B, frames=(3, 4), size=(32, 24), key_prefix="b", seed=1)
    return out / "a", out / "b"


def mix(folders, epoch_samples: int = 0, **prompts) -> Mix:
    a, b = folders
    return Mix((Source("a", str(a), 3.0, prompts.get("a")), Source("b", str(b), 1.0, prompts.get("b"))), epoch_samples)


def mixed_loader(folders, layout: Layout = ONE_RANK, rank: int = 0, epoch_samples: int = 0, **settings):
    return layout_loader(mix(folders, epoch_samples), layout, rank, **settings)


def epoch_batches(data, epoch: int, skip: int = 0, stretches=()) -> list[dict]:
    data.set_epoch(epoch, skip_batches=skip, stretches=stretches)
    batches = list(data.dataloader)
    assert len(batches) == data.stretch_batches(stretches) - skip
    return batches


def test_a_mixed_epoch_gives_each_source_its_share_and_names_it(folders):
    """3:1 over the 60 samples: 45 from a, 15 from b (b's 12 samples and 3 of its next pass)."""
    counts = Counter()  # 2 ranks x 2 workers x 15: the 60 exactly
    for rank in range(2):
        data = mixed_loader(folders, Layout(2, 2, 3, 1), rank=rank)
        for batch in epoch_batches(data, 1):
            assert batch["source"] == [key[0] for key in batch["key"]]
            counts.update(batch["source"])
    assert counts == {"a": 45, "b": 15}


def test_a_fixed_epoch_size_takes_the_shares_of_it(folders):
    data = mixed_loader(folders, epoch_samples=24)  # one rank, 2 workers, batches of 4: 24 exactly
    assert data.num_batches == 6
    for epoch in range(3):
        counts = Counter(itertools.chain(*(batch["source"] for batch in epoch_batches(data, epoch))))
        assert counts == {"a": 18, "b": 6}


def test_a_mixed_epoch_resumes_mid_epoch_exactly(folders):
    data = mixed_loader(folders, ONE_RANK)
    full = epoch_batches(data, 2)
    for skip in (3, 8):
        assert_same_batches(epoch_batches(data, 2, skip), full[skip:])


def micro_steps(folders, layout: Layout, epoch: int, stretches=()) -> list[list[str]]:
    per_rank = [
        [batch["key"] for batch in epoch_batches(mixed_loader(folders, layout, rank), epoch, 0, stretches)]
        for rank in range(layout.world_size)
    ]
    assert len({len(batches) for batches in per_rank}) == 1, "ranks with unequal batch counts"
    return [list(itertools.chain(*step)) for step in zip(*per_rank)]


def test_a_mixed_epoch_resumed_on_other_world_sizes_reads_every_planned_sample_once(folders):
    """2 ranks x 2 workers in batches of 3 consume 2 micro-steps, 3 ranks in batches of 2 consume 3, one rank
    finishes: together exactly the samples the uninterrupted epoch plans (b's 15 include 3 of its next pass)."""
    first, second, third = Layout(2, 2, 3, 1), Layout(3, 1, 2, 1), Layout(1, 2, 3, 1)
    uninterrupted = micro_steps(folders, first, epoch=1)
    planned = Counter(itertools.chain(*uninterrupted))
    seen = Counter(itertools.chain(*uninterrupted[:2]))
    stretches = [Stretch(first, 2)]
    steps = micro_steps(folders, second, 1, stretches)
    assert len(steps) == 8  # the 48 samples left, 6 per micro-step
    seen.update(itertools.chain(*steps[:3]))
    stretches.append(Stretch(second, 3))
    steps = micro_steps(folders, third, 1, stretches)
    assert len(steps) == 10  # the 30 left, in batches of 3
    seen.update(itertools.chain(*steps))
    assert seen == planned and sum(planned.values()) == 60
    assert sum(n for key, n in planned.items() if key.startswith("b")) == 15


def test_a_resampled_mix_reads_an_epoch_of_draws_from_both_sources(folders):
    data = mixed_loader(folders, ONE_RANK, resampled=True, epoch_samples=120)
    counts = Counter(itertools.chain(*(batch["source"] for batch in epoch_batches(data, 0))))
    assert sum(counts.values()) == 120 and set(counts) == {"a", "b"}


def test_each_source_makes_its_own_prompts(folders):
    data = flat_loader(
        mix(folders, b=lambda labels: "from b"),
        mode="frame",
        batch_size=4,
        prompt_fn=build_prompt,
        image=ImageSpec(size=16),
        seed=1,
        shuffle=True,
    )
    batches = epoch_batches(data, 0)
    prompts = {key: prompt for batch in batches for key, prompt in zip(batch["key"], batch["prompt"])}
    assert {prompt for key, prompt in prompts.items() if key.startswith("b")} == {"from b"}
    assert all(prompt != "from b" and "Intensity" in prompt for key, prompt in prompts.items() if key[0] == "a")


# ---------------------------------------------------------------------------------------- prompts and loss


def test_prompt_families_keep_only_their_columns():
    labels = {"Expression": "Happiness", "Valence": 0.5, "Arousal": 0.7, "AU12": 1.0, "Joy": 0.9}
    assert build_prompt(labels, families=("va",)) == "Valence=0.50, Arousal=0.70"
    assert build_prompt(labels, families=("expression",)) == "Happiness"
    assert build_prompt(labels, families=("au", "expression")) == "Happiness with AU12 (Lip Corner Puller)"
    assert build_prompt(labels, families=("emi",)) == "Joy (Intensity: High)"
    with pytest.raises(ValueError, match="no usable value"):
        build_prompt({"Joy": 0.9}, families=("va",))


def test_a_sample_without_va_spread_weighs_one_in_the_contrastive_loss():
    """Stage I masks missing Valence_std/Arousal_std labels to NaN (emi.stages.stage1.contrastive_loss)."""
    labels = torch.tensor([[0.0, 0.0], [0.2, 0.4], [0.3, 0.3]])
    mask = torch.tensor([[False, False], [True, True], [True, True]])
    weights = va_confidence_weights(labels.masked_fill(~mask, float("nan")), 3, scale=0.3)
    assert weights[0].item() == 1.0
    assert weights[1:].tolist() == pytest.approx([1 / (1 + 0.3 / 0.3)] * 2)


# ------------------------------------------------------------------------------------------ config, telemetry


def stage1(data: dict) -> Stage1Config:
    return build_config(Stage1Config, {"data": data}, "run.yaml")


def test_a_list_of_sources_loads_and_becomes_a_mix():
    config = stage1(
        {
            "sources": [
                {"shards": "data/shards/emi", "weight": 3, "name": "emi"},
                {"shards": "data/shards/expr/", "prompts": ["expression", "va"]},
            ],
            "epoch_samples": 96,
        }
    )
    assert config.data.sources[0].weight == 3.0 and isinstance(config.data.sources[0].weight, float)
    shards = train_shards(config.data)
    assert [(s.name, s.shards, s.weight) for s in shards.sources] == [
        ("emi", "data/shards/emi", 3.0),
        ("expr", "data/shards/expr/", 1.0),
    ]
    assert shards.epoch_samples == 96 and shards.sources[0].prompt_fn is None
    assert shards.sources[1].prompt_fn({"Expression": "Sadness", "AU1": 1, "Valence": 0.1}) == "Sadness, Valence=0.10"
    assert train_shards(stage1({"train": "data/shards/emi"}).data) == "data/shards/emi"


@pytest.mark.parametrize(
    "data,message",
    [
        ({"train": "x", "sources": [{"shards": "y"}]}, "data.train and data.sources are both set"),
        ({"sources": []}, "data.sources is empty"),
        ({"sources": [{"shards": "x", "weight": 0}]}, r"data.sources\[0\].weight must be > 0, got 0"),
        ({"sources": [{"shards": "x"}, {"shards": "y", "weight": -1}]}, r"data.sources\[1\].weight must be > 0"),
        ({"sources": [{"shards": "a/x"}, {"shards": "b/x"}]}, "has the name 'x' twice"),
        ({"sources": [{"weight": 2}]}, r"data.sources\[0\].shards is not set"),
        ({"sources": [{"shards": "x", "wieght": 2}]}, r"unknown key 'data.sources\[0\].wieght'"),
        ({"sources": "x"}, "data.sources must be a list"),
        ({"epoch_samples": -1}, "data.epoch_samples must be >= 0"),
        ({"sources": [{"shards": "x", "prompts": ["va", "faces"]}]}, r"data.sources\[0\].prompts has \['faces'\]"),
        ({"sources": [{"shards": "x", "prompts": []}]}, r"data.sources\[0\].prompts has no family"),
    ],
)
def test_bad_sources_fail_on_load_with_one_line(data, message):
    with pytest.raises(UsageError, match=message) as err:
        stage1(data)
    assert "\n" not in str(err.value) and str(err.value).startswith("run.yaml: ")


def test_per_source_counts_add_up_and_start_again():
    counts = SourceCounts()
    counts.add({"source": ["a", "b", "a"]})
    counts.add({"key": ["x"]})  # a plain data set's batch names no source
    counts.add({"source": ["a"]})
    assert counts.gather() == {"a": 3, "b": 1} and counts.gather() == {}


def test_stage1_trains_on_two_sources_and_says_what_each_gave(folders, tmp_path):
    """Two ranks, 3:1 over the 60 samples in batches of 3 (drop_last: 30 per rank): each epoch 45 from a, 15 from b."""
    a, b = folders
    launch(
        "-m",
        [
            "emi.stages.stage1",
            "--config",
            "configs/stage1/tiny.yaml",
            'data.train=""',
            "data.val=null",
            f"data.sources=[{{shards: {a}, weight: 3}}, {{shards: {b}, name: b}}]",
            f"run.output_dir={tmp_path}",
            "run.name=mix",
            "data.batch_size=3",
            "data.num_workers=0",
            "train.epochs=2",
            "train.strategy=ddp",
            "train.save=false",
        ],
    )
    log = (tmp_path / "mix" / "log.txt").read_text()
    for epoch in (1, 2):
        assert f"epoch {epoch}/2: samples per source: a 45, b 15" in log, log
    assert scalars(tmp_path / "mix", "train/samples/a") == [(10, 45.0), (20, 45.0)]
    assert scalars(tmp_path / "mix", "train/samples/b") == [(10, 15.0), (20, 15.0)]
