"""The loader end to end: exact mid-epoch resume, resampled epochs, corrupt data, spawn workers."""

from __future__ import annotations

import itertools
import pickle
import tarfile
from pathlib import Path

import pytest

import emi.data.loader
from emi.data import AudioSpec, ImageSpec
from emi.errors import UsageError

from helpers import PickleBomb, assert_same_batches, flat_loader, run_epoch, write_shards

SIZES = [5, 7, 9]


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("clean")
    keys = write_shards(out, SIZES, frames=(3, 5))
    return out, [key for shard in keys for key in shard]


def loader(folder: Path, **kwargs):
    settings = dict(
        mode="clip",
        batch_size=2,
        num_workers=2,
        world_size=1,
        rank=0,
        seed=5,
        shuffle=True,
        train=True,
        shuffle_buffer=6,
        num_frames=3,
        image=ImageSpec(size=24),
        audio=AudioSpec(seconds=0.2, gain_db=(-6, 6), snr_db=(10, 30)),
    )
    return flat_loader(str(folder), **{**settings, **kwargs})


def test_resume_mid_epoch_yields_the_remaining_batches_exactly(clean):
    folder, keys = clean
    data = loader(folder)
    assert data.num_batches == 2 * 6 and data.num_samples == 24  # P = ceil(21 / 2) -> 12 -> 6 batches
    first = run_epoch(data, 0)
    full = run_epoch(data, 1)
    assert len(full) == data.num_batches
    assert [b["key"] for b in first] != [b["key"] for b in full]
    assert set(itertools.chain(*(b["key"] for b in full))) == set(keys)
    for skip in (5, 8):  # odd: the first resumed batch comes from worker 1 of the full epoch
        assert_same_batches(run_epoch(data, 1, skip_batches=skip), full[skip:])
    assert_same_batches(run_epoch(data, 1), full)


def test_resume_skips_without_decoding(clean, monkeypatch):
    folder, _ = clean
    decoded = []
    real_decode = emi.data.loader.decode_sample

    def counting_decode(raw, spec, rng):
        decoded.append(raw.key)
        return real_decode(raw, spec, rng)

    monkeypatch.setattr(emi.data.loader, "decode_sample", counting_decode)
    data = loader(folder, num_workers=0, batch_size=3)
    full = run_epoch(data, 2)
    assert len(decoded) == 21
    decoded.clear()
    resumed = run_epoch(data, 2, skip_batches=4)
    assert len(decoded) == 21 - 4 * 3
    assert_same_batches(resumed, full[4:])


def test_resampled_mode_yields_the_promised_batches_on_every_rank(clean):
    folder, keys = clean
    for rank in range(2):
        data = loader(folder, resampled=True, world_size=2, rank=rank, batch_size=2, num_workers=2)
        # ceil(21 / (2 ranks x 2 workers x 2)) = 3 batches per worker, 6 per rank.
        assert data.num_batches == 6
        batches = run_epoch(data, 0)
        assert len(batches) == 6 and all(len(b["key"]) == 2 for b in batches)
        assert set(itertools.chain(*(b["key"] for b in batches))) <= set(keys)
        assert [b["key"] for b in run_epoch(data, 1)] != [b["key"] for b in batches]


def test_spawned_workers_give_the_same_batches_as_forked_ones(clean):
    folder, _ = clean
    forked = run_epoch(loader(folder, persistent_workers=False), 3)
    spawned = run_epoch(loader(folder, persistent_workers=False, start_method="spawn"), 3)
    assert_same_batches(spawned, forked)


CORRUPT_SIZES = [6, 8, 4]
BAD_KEYS = {"s0-001", "s0-002", "s0-004"} | {f"s1-{i:03d}" for i in range(4, 8)}


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("corrupt")
    clean_keys = write_shards(out, CORRUPT_SIZES, frames=(3, 4))
    with tarfile.open(out / "train-000000.tar") as sample:
        jpeg = sample.extractfile("s0-001.0000.jpg").read()
    bomb = pickle.dumps(PickleBomb(out / "unpickled"))
    write_shards(
        out,
        CORRUPT_SIZES,
        frames=(3, 4),
        edits={
            "s0-001": {"0000.jpg": jpeg[: len(jpeg) // 2]},  # a truncated JPEG
            "s0-002": {"0001.jpg": b"plain text, not a JPEG"},  # not a JPEG at all
            "s0-003": {"pyd": bomb, "pickle": bomb},  # pickles: ignored, never loaded
            "s0-004": {"wav": None},  # no audio
        },
    )
    shard = out / "train-000001.tar"  # cut in the middle of sample s1-004: it and the rest are lost
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith("s1-004."))
    shard.write_bytes(shard.read_bytes()[: member.offset_data + member.size // 2])
    return out, [key for keys in clean_keys for key in keys]


def expected_stream(keys: list[str], begin: int, per_consumer: int) -> tuple[list[str], int]:
    """The spec'd behaviour for an unshuffled consumer: its slice minus bad samples, filled up from its
    slice start onwards through the whole (cyclic) sequence; and the number of bad samples it counts: those of
    its slice, each once, where the epoch first plans them (not the wrap-around repeats, not the fill-up)."""
    cycle = itertools.cycle(keys[begin % len(keys) :] + keys[: begin % len(keys)])
    planned = [next(cycle) for _ in range(per_consumer)]
    stream = [k for k in planned if k not in BAD_KEYS]
    skipped = sum(key in BAD_KEYS for key in planned[: len(keys) - begin])
    cycle = itertools.cycle(keys[begin % len(keys) :] + keys[: begin % len(keys)])
    while len(stream) < per_consumer:
        key = next(cycle)
        if key not in BAD_KEYS:
            stream.append(key)
    return stream, skipped


def test_corrupt_samples_are_skipped_named_counted_and_filled_up(corrupt, caplog):
    folder, keys = corrupt
    data = loader(folder, num_workers=0, batch_size=4, shuffle=False, num_frames=0)
    batches = run_epoch(data, 0)
    want, skipped = expected_stream(keys, 0, 20)  # P = 18 rounded up to 20
    assert len(batches) == data.num_batches == 5
    assert list(itertools.chain(*(b["key"] for b in batches))) == want
    # Met 15 times: the wrap-around (s0-001) and the fill-up, which cycles through all 18 again, repeat them.
    assert skipped == len(BAD_KEYS) == 7
    assert data.skipped() == skipped and batches[-1]["num_skipped"] == skipped
    assert not (folder / "unpickled").exists()
    shard0, shard1 = folder / "train-000000.tar", folder / "train-000001.tar"
    for key, reason in [
        ("s0-001", "0000.jpg: corrupt JPEG"),
        ("s0-002", "0001.jpg: not an image"),
        ("s0-004", "no .wav entry"),
    ]:
        assert caplog.text.count(f"shard {shard0}: skipping sample '{key}': {reason}") == 1, key
    assert caplog.text.count(f"shard {shard1}: unreadable in sample 's1-004'") == 1
    assert f"skipped {skipped} corrupt samples this epoch (see warnings above)" in caplog.text

    caplog.clear()  # every epoch names and counts them again, once
    run_epoch(data, 1)
    assert data.skipped() == 7 and caplog.text.count("skipping sample 's0-001'") == 1


def test_corrupt_data_with_workers_keeps_the_batch_count_exact(corrupt):
    folder, keys = corrupt
    data = loader(folder, num_workers=2, batch_size=2, shuffle=False, num_frames=0)
    batches = run_epoch(data, 0)
    # P = ceil(18 / 2) = 9 -> 10; worker 0 gives batches 0, 2, ...; worker 1 gives 1, 3, ...
    streams = [expected_stream(keys, c * 10, 10) for c in range(2)]
    assert len(batches) == data.num_batches == 10
    for worker, (want, skipped) in enumerate(streams):
        assert list(itertools.chain(*(b["key"] for b in batches[worker::2]))) == want
        assert batches[-2 + worker]["num_skipped"] == skipped
    assert [skipped for _, skipped in streams] == [3, 4]  # worker 1's wrap-around s0-001 is worker 0's
    assert data.skipped() == len(BAD_KEYS)
    # Batches built in shared memory by the workers are zero past the mask.
    assert any(not b["frame_mask"].all() for b in batches)
    assert all((b["frames"][~b["frame_mask"]] == 0).all() for b in batches)


def test_a_data_set_without_a_valid_sample_is_a_clear_error(tmp_path):
    write_shards(
        tmp_path,
        [3, 2],
        frames=(1, 1),
        size=(16, 16),
        edits={f"s{s}-{i:03d}": {"wav": None} for s in range(2) for i in range(3)},
    )
    data = loader(tmp_path, num_workers=0)
    with pytest.raises(UsageError, match="5 samples in a row were unusable.*no valid sample"):
        run_epoch(data, 0)
