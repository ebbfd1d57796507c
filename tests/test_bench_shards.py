"""The shard-building benchmark on a quick run: real builds, self-consistent numbers (never a speed check)."""

import statistics
import wave
from pathlib import Path

import pytest
from PIL import Image

from benchmarks import bench_shards, harness
from emi.formats.manifest import read_manifest
from emi.shards.sample import JPEG_QUALITY

SETS = ("short", "long")


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    return bench_shards.run(tmp_path_factory.mktemp("bench-shards"), quick=True)


def per_round(measured: dict, name: str, metric: str) -> list[float]:
    return [measured_round[name][metric] for measured_round in measured["rounds"]["rounds"]]


def rates(measured: dict, name: str) -> list[float]:
    return [m[name]["units"] / m[name]["wall_s"] for m in measured["rounds"]["rounds"]]


def test_every_contender_builds_every_clip_with_the_builders_frames(result):
    assert result["quick"] and result["sizes"]["rounds"] == 2
    expected_baselines = [n for n in bench_shards.BASELINES if n != "torchcodec" or not result["torchcodec_skipped"]]
    assert result["baselines"] == expected_baselines
    for name in SETS:
        measured = result["sets"][name]
        contenders = ["emi", *result["baselines"], *bench_shards.FLOORS]
        assert list(measured["rounds"]["rounds"][0]) == contenders
        for contender in contenders:  # the same unique clips, every round
            assert per_round(measured, contender, "units") == [measured["clips"]] * 2
        assert measured["frames"] == {n: measured["expected_frames"] for n in ["emi", *result["baselines"]]}
        assert measured["expected_frames"] >= measured["clips"] * 2 * bench_shards.FPS
        manifest = read_manifest(measured["emi_shards"])
        assert manifest.num_samples == measured["clips"] and manifest.num_frames == measured["expected_frames"]
    assert result["sets"]["short"]["sizes"] == ["456x256"]  # 640x360 -> short side 256, as the builder
    assert result["sets"]["long"]["sizes"] == ["456x256"]  # 1280x720 likewise


def test_baselines_write_jpegs_of_the_builders_size_and_full_wavs(result):
    work = Path(result["sets"]["short"]["emi_shards"]).parents[2]
    tasks = bench_shards.plan(work / "short-clips" / "videos")
    for baseline in result["baselines"]:
        build = sorted((work / "short" / baseline).iterdir())[-1]  # its last round's
        assert sorted(clip.name for clip in build.iterdir()) == [task.key for task in tasks]
        for task in tasks:
            frames = sorted((build / task.key).glob("*.jpg"))
            assert len(frames) == task.num_frames
            with Image.open(frames[-1]) as image:
                assert image.format == "JPEG" and image.size == (task.width, task.height)
            with wave.open(str(build / task.key / "audio.wav")) as audio:
                assert (audio.getnchannels(), audio.getframerate()) == (1, bench_shards.SAMPLE_RATE)
                if baseline not in ("ffmpeg_cli", "ffmpeg_pipe"):  # ffmpeg writes what the stream holds
                    assert audio.getnframes() == task.num_samples
    assert bench_shards.JPEG_QUALITY == JPEG_QUALITY  # the Python baselines encode as emi does


def test_ratios_are_medians_of_the_per_round_values(result):
    for name in SETS:
        measured = result["sets"][name]
        medians = {n: statistics.median(rates(measured, n)) for n in result["baselines"]}
        assert measured["baseline"] == max(medians, key=medians.get)
        best = rates(measured, measured["baseline"])
        ratios = [a / b for a, b in zip(rates(measured, "emi"), best)]
        assert measured["ratio"]["median"] == pytest.approx(statistics.median(ratios))
        assert (measured["ratio"]["low"], measured["ratio"]["high"]) == pytest.approx((min(ratios), max(ratios)))
        assert measured["met"] == (measured["ratio"]["median"] >= bench_shards.SPEED_TARGET)
        emi_cpu = per_round(measured, "emi", "cpu_s")
        for floor_name in bench_shards.FLOORS:
            floor = measured["floors"][floor_name]
            # the floor counts the workers' CPU besides this process's: at least what the harness saw
            assert all(c > h >= 0 for c, h in zip(floor["cpu_s"], per_round(measured, floor_name, "cpu_s")))
            over = statistics.median(a / b for a, b in zip(emi_cpu, floor["cpu_s"]))
            assert floor["emi_over"]["median"] == pytest.approx(over)
            per_second = statistics.median(floor["cpu_s"]) / measured["clip_seconds"]
            assert floor["cpu_s_per_clip_s"]["median"] == pytest.approx(per_second, rel=0.01)
        floors = measured["floors"]
        assert floors["decode"]["cpu_s_per_clip_s"]["median"] < floors["decode_encode"]["cpu_s_per_clip_s"]["median"]
        assert floors["decode_encode"]["met"] == (floors["decode_encode"]["emi_over"]["median"] <= 1.15)


def test_memory_is_measured_on_both_clips_and_the_met_flags_follow_the_targets(result):
    memory = result["memory"]
    assert (memory["short_s"], memory["long_s"], memory["size"]) == (1, 4, "160x90")
    assert "none" in memory["crops"]
    for crop in memory["crops"].values():
        assert 20 < crop["short_mb"] < 2000 and 20 < crop["long_mb"] < 2000
        assert crop["ratio"] == pytest.approx(crop["long_mb"] / crop["short_mb"], abs=2e-3)
    assert memory["met"] == all(c["ratio"] <= bench_shards.MEMORY_TARGET for c in memory["crops"].values())
    sets = result["sets"].values()
    assert result["met"] == (all(s["met"] and s["floors"]["decode_encode"]["met"] for s in sets) and memory["met"])


def test_section_and_summary_show_the_numbers_and_verdicts(result):
    text = bench_shards.section(result)
    assert "$" not in text and not text.startswith("#")
    for name in SETS:
        measured = result["sets"][name]
        ratio = harness.Spread(**measured["ratio"]).show()
        assert f"**{ratio}**" in text and f"({measured['baseline']})" in text
        assert measured["load"] in text
    assert text.count("**met**") + text.count("**not met**") == 5  # 2 speed, 2 floor, 1 memory targets
    rows = bench_shards.summary(result)
    assert len(rows) == 4 + len(result["memory"]["crops"])
    assert all(len(row) == 4 and row[3] in ("yes", "**no**") for row in rows)
    short_speed = rows[0]
    assert short_speed[1] == harness.Spread(**result["sets"]["short"]["ratio"]).show()
    assert short_speed[3] == ("yes" if result["sets"]["short"]["met"] else "**no**")
