"""The object-storage benchmark on tiny inputs: well-formed, self-consistent numbers (never a speed check)."""

import statistics

import pytest

from benchmarks import bench_loader, bench_storage


def test_storage_benchmark_reads_the_same_samples_from_the_s3_server_and_disk(tmp_path):
    shards = bench_loader.write_synthetic_shards(tmp_path / "shards", num_clips=8, shard_size=4)
    result = bench_storage.run(tmp_path / "work", shards=shards, rounds=2)
    if "skipped" in result:
        pytest.skip(result["skipped"])
    assert result["samples"] == 8 and len(result["keys"]) == 8 and result["num_rounds"] == 2
    names = [config.name for config in bench_storage.CONFIGS]
    assert sorted(result["contenders"]) == sorted(names)
    rounds = result["rounds"]["rounds"]
    assert len(rounds) == 2 and all(measured[name]["units"] == 8 for measured in rounds for name in names)
    for ratio in result["ratios"].values():
        per_round = [
            (m[ratio["s3"]]["units"] / m[ratio["s3"]]["wall_s"])
            / (m[ratio["disk"]]["units"] / m[ratio["disk"]]["wall_s"])
            for m in rounds
        ]
        assert ratio["median"] == pytest.approx(statistics.median(per_round))
        assert ratio["low"] == pytest.approx(min(per_round)) and ratio["met"] == (ratio["median"] >= 0.8)
    for contender in result["contenders"].values():
        assert contender["cpu_ms_per_sample"]["median"] > 0
    assert result["met"] == all(ratio["met"] for ratio in result["ratios"].values())
    text = bench_storage.section(result)
    assert "new loader each epoch, 2 workers" in text and ("**met**" in text) == result["met"]
    assert len(bench_storage.summary(result)) == 4


def test_a_stalled_epoch_fails_naming_its_configuration(tmp_path):
    """An epoch past its deadline ends the benchmark with an error that names the configuration (here every epoch
    stalls: the deadline is shorter than any epoch can be)."""
    shards = bench_loader.write_synthetic_shards(tmp_path / "shards", num_clips=4, shard_size=4)
    with pytest.raises(bench_storage.Stalled, match=r"disk \(new loader each epoch, 1 worker\), epoch 0"):
        bench_storage.run(tmp_path / "work", shards=shards, rounds=1, deadline_s=1e-4)
