"""benchmarks/scaling_resize.py, at small sizes: the re-planning counts are what the loader does, the checkpoint
conversion is measured in real launches, the model of the vitl resume is consistent with them, and its section of
SCALING.md is written beside the others (which benchmarks/scaling.py keeps when it rewrites its own)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import scaling, scaling_resize
from benchmarks.results import sections
from emi.data.plan import emission_order
from emi.formats.checkpoint import Layout, Stretch

from helpers import flat_loader, write_shards

SHUFFLE_BUFFER = 64
SAMPLES = [400, 400, 200]  # 1,000: a slice of 32 (one batch) for each of 2 or 3 ranks x 8 workers


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resize-bench")
    write_shards(out, SAMPLES, frames=(1, 1), size=(8, 8))
    return out


def loader_streams(shards: Path, ranks: int, new_ranks: int, stretches: list[Stretch]) -> dict[str, int]:
    """What worker 0 of rank 0 of the new layout does in a real loader: its quota of samples, and the slice streams
    it opens (counted by standing in for the one method that reads a slice)."""
    data = flat_loader(
        str(shards),
        mode="clip",
        num_frames=1,
        batch_size=scaling_resize.BATCH,
        num_workers=scaling_resize.WORKERS,
        world_size=new_ranks,
        rank=0,
        seed=0,
        shuffle=True,
        drop_last=True,
        shuffle_buffer=SHUFFLE_BUFFER,
    )
    dataset = data.dataset
    opened, open_now, most = [], [0], [0]

    def slice_stream(consumer, epoch, *rest):
        per_consumer, wanted = rest[-2], rest[-1]
        opened.append(consumer)
        open_now[0] += 1
        most[0] = max(most[0], open_now[0])
        try:
            shape = dataset._shape(epoch)
            for position in emission_order(shape, consumer, per_consumer).tolist():
                if position in wanted:
                    yield position, None
        finally:
            open_now[0] -= 1

    dataset._slice_stream = slice_stream
    samples, quota = dataset._stretch_samples(0, 0, 0, stretches)
    for _ in range(quota):  # the tickets' first places; the make-up reads after them would open the shards
        next(samples)
    samples.close()
    return {"tickets": quota, "slices": len(set(opened)), "streams": len(opened), "open_at_once": most[0]}


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 8 workers on 2 cores: never started here
@pytest.mark.parametrize("new_ranks", [1, 3])
def test_the_measured_worker_share_is_what_the_loader_reads(shards, new_ranks):
    shape = scaling_resize.epoch_shape(sum(SAMPLES), SHUFFLE_BUFFER)
    stretches, plan = scaling_resize.resized_epoch(shape, 2, new_ranks)
    assert stretches == [Stretch(Layout(2, scaling_resize.WORKERS, scaling_resize.BATCH, 1), 4)]
    steps, _ = plan()
    share = scaling_resize.worker_share(shape, stretches, steps, 0, 0)
    counts = {key: share[key] for key in ("tickets", "slices", "streams", "open_at_once")}
    assert counts == loader_streams(shards, 2, new_ranks, stretches)
    assert share["tickets"] > 0 and share["streams"] >= share["slices"] >= 1


def test_replanning_reports_every_resize_and_says_which_cannot_start():
    plan = scaling_resize.replanning({"small": 2_000}, (2, 8), repeats=1)
    rows = {(row["ranks"], row["new_ranks"]): row for row in plan["rows"]}
    assert sorted(rows) == [(2, 1), (2, 4), (8, 4), (8, 16)]
    assert "cannot give each of 64 consumers" in rows[(8, 4)]["impossible"]  # 2,000 / 64 < one batch of 32
    for key in [(2, 1), (2, 4)]:
        row = rows[key]
        assert row["plan_s"] > 0 and row["plan_peak_bytes"] > 0 and row["worker_s"] > 0
        # 16 slices of 96 (1,536 tickets), half of them left, dealt out again in whole steps of the new layout
        assert row["batches_per_rank"] == 768 // (key[1] * 32)
        assert row["read_ahead_samples"] == row["worker_open_at_once"] * plan["shuffle_buffer"]
        assert 1 <= row["slices_median"] <= row["slices_max"]


@pytest.fixture(scope="module")
def converted() -> dict:
    """zero2 saved by 2 CPU processes and resumed by 2 and by 1: real launches, a small MLP."""
    return scaling_resize.conversions(("zero2",), hidden=256, layers=2, resumed=1)


def test_the_conversion_is_measured_in_real_launches(converted):
    same, other = converted["zero2"]["same"], converted["zero2"]["other"]
    parameters = 2 * (256 * 256 + 256)
    assert (same["parameters"], same["processes"], other["processes"]) == (parameters, 2, 1)
    # fp32 master weights and Adam's two moments, in the partitions and again in the universal form
    assert same["optimizer_bytes"] >= 12 * parameters and same["checkpoint_bytes"] > same["optimizer_bytes"]
    conversion = other["conversion"]
    assert conversion["universal_bytes"] >= 12 * parameters
    assert conversion["read_bytes"] >= same["optimizer_bytes"] and conversion["written_bytes"] >= 12 * parameters
    assert 0 < conversion["wall_s"] < other["load"]["wall_s"]
    assert other["load"]["read_bytes"] - conversion["read_bytes"] >= 12 * parameters  # every full tensor
    assert same["load"]["rss_peak"] >= same["load"]["rss_before"] > 0


def test_the_modelled_resume_grows_with_the_state_and_the_ranks(converted):
    rates = scaling_resize.Rates.of(converted["zero2"])
    fs = {"reader": 2.0, "writer": 1.0, "total": 50.0}
    small, large = (scaling_resize.resume_times(rates, p, 64, fs) for p in (10**8, 10**9))
    for key in ("state_bytes", "same_s", "convert_s", "other_load_s", "other_s"):
        assert large[key] == pytest.approx(10 * small[key], rel=0.01) or large[key] > small[key]
    by_ranks = [scaling_resize.resume_times(rates, 10**9, ranks, fs) for ranks in (8, 64, 512)]
    assert by_ranks[0]["same_read"] > by_ranks[1]["same_read"] > by_ranks[2]["same_read"]
    assert by_ranks[0]["other_read"] == by_ranks[2]["other_read"]  # every rank reads every full tensor
    assert len({t["convert_s"] for t in by_ranks}) == 1  # rank 0 alone, whatever N
    assert by_ranks[2]["other_load_s"] > by_ranks[1]["other_load_s"]  # N full reads through the total bandwidth
    overtakes = scaling_resize.load_overtakes_conversion(rates, 10**9, fs)
    assert overtakes is None or (
        scaling_resize.resume_times(rates, 10**9, overtakes, fs)["other_load_s"]
        > scaling_resize.resume_times(rates, 10**9, overtakes, fs)["convert_s"]
    )


def test_the_section_is_written_beside_the_scaling_document(converted, tmp_path):
    out = tmp_path / "SCALING.md"
    out.write_text(scaling.SCALING.read_text())
    before = sections(out.read_text())
    plan = scaling_resize.replanning({"small": 2_000}, (2,), repeats=1)
    body = scaling_resize.document(plan, converted, 729_700_000, resumed=1, quick=True)
    scaling_resize.write_section(scaling_resize.HEADING, body, out)
    after = sections(out.read_text())
    assert {k: v.strip() for k, v in after.items() if k != scaling_resize.HEADING} == {
        k: v.strip() for k, v in before.items() if k != scaling_resize.HEADING
    }
    section = after[scaling_resize.HEADING]
    assert "| zero2 | 8 |" in section and "| zero2 | 512 |" in section and "| small | 2 -> 4 |" in section
    # benchmarks/scaling.py rewrites its sections 1-4 and keeps this one
    own = [heading for heading in before if heading != scaling_resize.HEADING]
    scaling.write_document(out, "# Scaling\n\n" + "".join(f"## {heading}\n\nnew\n\n" for heading in own))
    kept = sections(out.read_text())
    assert list(kept) == [*own, scaling_resize.HEADING]
    assert [kept[heading] for heading in own] == [f"## {heading}\n\nnew\n\n" for heading in own]
    assert kept[scaling_resize.HEADING].strip() == section.strip()
