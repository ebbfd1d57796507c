"""The Stage II benchmark on tiny inputs: well-formed, self-consistent numbers (never a speed check)."""

import statistics

import pytest

from benchmarks import bench_stage2


def test_stage2_benchmark_sees_the_same_clips_both_ways(tmp_path):
    result = bench_stage2.run(tmp_path, quick=True)
    clips = bench_stage2.QUICK_CLIPS
    assert result["clips"] == clips and result["samples"] == clips  # whole batches: nothing padded or dropped
    assert (tmp_path / "features" / "manifest.json").is_file()
    rounds = result["rounds"]["rounds"]
    assert len(rounds) == result["num_rounds"] == 2
    per_round = [
        (m["cached"]["units"] / m["cached"]["wall_s"]) / (m["on_the_fly"]["units"] / m["on_the_fly"]["wall_s"])
        for m in rounds
    ]
    assert result["speedup"]["median"] == pytest.approx(statistics.median(per_round))
    assert result["speedup"]["met"] == (result["speedup"]["median"] >= bench_stage2.TARGET)
    text = bench_stage2.section(result)
    assert f"**{result['speedup']['median']:.2f}" in text and "$" not in text
    assert bench_stage2.summary(result)[0][2] == f">= {bench_stage2.TARGET}"
