"""Every benchmark runs on tiny inputs and returns well-formed, self-consistent numbers (never a speed check)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset

from benchmarks import (
    ablation,
    bench_loader,
    bench_shards,
    bench_stage2,
    bench_storage,
    bench_trainer,
    gpu_e2e,
    gpu_stage1,
    run,
    scaling,
    timing,
)
from emi.data import AudioSpec, ImageSpec
from emi.stages.stage1 import build_model, train_flops_per_sample

from helpers import GRID, REPO, cpu_env, flat_loader, free_port

GRID_CLIPS = sorted(GRID.glob("*.mpg"))
GRID_CLIP = GRID_CLIPS[0]


def test_best_of_rounds_keeps_the_least_time_of_each_piece_of_work():
    calls = []
    best = timing.best_of_rounds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3)
    assert calls == ["a", "b"] * 3  # interleaved rounds
    assert set(best) == {"a", "b"}
    for timings in best.values():
        assert set(timings) == {"wall_s", "cpu_s"} and timings["wall_s"] >= 0 and timings["cpu_s"] >= 0
    with pytest.raises(ValueError, match="repeats"):
        timing.best_of_rounds({"a": lambda: None}, repeats=0)


def test_table_is_markdown():
    assert timing.table(["x", "y"], [[1, "a"], [2.5, "b"]]) == "| x | y |\n|---|---|\n| 1 | a |\n| 2.5 | b |"


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Two synthetic clips and one GRID clip, with labels; and a work folder."""
    root = tmp_path_factory.mktemp("bench-clips")
    grid = root / "grid"
    grid.mkdir()
    shutil.copy(GRID_CLIP, grid)
    videos, labels = bench_shards.prepare_clips(root / "clips", synthetic=2, grid=grid)
    return videos, labels, root / "work"


@pytest.fixture(scope="module")
def shards_result(clips) -> dict:
    videos, labels, work = clips
    return bench_shards.run(
        videos,
        labels,
        work,
        repeats=1,
        long_clips=2,
        long_s=3,
        long_size="160x90",
        memory_short_s=1,
        memory_long_s=4,
        memory_size="160x90",
    )


def test_shard_benchmark_builds_every_clip_and_does_the_same_work_as_the_baselines(shards_result, clips):
    result = shards_result
    assert result["workers"] == 2 and result["repeats"] == 1 and result["long_clip"] == {"seconds": 3, "size": "160x90"}
    for name, clips_in_set in (("short", 3), ("long", 2)):
        speed = result[name]
        assert speed["clips"] == clips_in_set
        # every clip built, and each baseline wrote as many 5 fps frames as the builder
        frames = speed["frames"]
        assert frames["emi"] == frames["ffmpeg_cli"] == frames["ffmpeg_pipe"] >= clips_in_set * 3 * 5
        for runner in ("emi", *bench_shards.BASELINES):
            timings = speed[runner]
            assert timings["wall_s"] > 0 and timings["cpu_ms_per_clip"] > 0
            # clips_per_s is rounded to 2 decimals and wall_s to 3: the wall time measured lies within 0.0005 s
            # of wall_s (0.3% of a 0.15 s set)
            fastest, slowest = (clips_in_set / (timings["wall_s"] + sign * 5e-4) for sign in (-1, 1))
            assert slowest - 5e-3 <= timings["clips_per_s"] <= fastest + 5e-3
        assert speed["baseline"] == max(bench_shards.BASELINES, key=lambda runner: speed[runner]["clips_per_s"])
        assert speed["ratio"] == pytest.approx(
            speed["emi"]["clips_per_s"] / speed[speed["baseline"]]["clips_per_s"], abs=1e-3
        )
        assert speed["met"] == (speed["ratio"] >= bench_shards.TARGET)
    manifest = json.loads((clips[2] / "emi" / "manifest.json").read_text())
    assert manifest["args"]["frame_size"] == bench_shards.FRAME_SIZE and manifest["num_samples"] == 3
    for baseline in bench_shards.BASELINES:
        assert len(list((clips[2] / baseline).glob("*/audio.wav"))) == 3
    text = bench_shards.section(result)
    assert text.startswith("## 1. Shard building") and f"**{result['short']['ratio']}**" in text


def test_shard_benchmark_measures_peak_memory_of_short_and_long_clips(shards_result):
    memory = shards_result["memory"]
    assert (memory["short_s"], memory["long_s"], memory["size"]) == (1, 4, "160x90")
    crops = [crop for crop in ("none", "opencv") if crop in memory]
    assert "none" in crops
    for crop in crops:
        assert 20 < memory[crop]["short_mb"] < 2000 and 20 < memory[crop]["long_mb"] < 2000
        assert memory[crop]["ratio"] == pytest.approx(memory[crop]["long_mb"] / memory[crop]["short_mb"], abs=2e-3)
    assert memory["met"] == all(memory[crop]["ratio"] <= bench_shards.MEMORY_TARGET for crop in crops)
    assert shards_result["met"] == (shards_result["short"]["met"] and shards_result["long"]["met"] and memory["met"])


def test_baselines_write_frames_of_the_builders_size(clips, tmp_path):
    videos, _, _ = clips
    commands = {Path(command[-1]).parent.name: command for command in bench_shards.ffmpeg_commands(videos, tmp_path)}
    assert "fps=5,scale=320:256" in commands[GRID_CLIP.stem]  # 360x288 -> short side 256, as the builder
    assert "fps=5,scale=256:256" in commands["00001"]  # the synthetic clips are 128x128
    clip = videos / GRID_CLIP.name
    bench_shards.run_pipe(bench_shards.pipe_command(clip, tmp_path / "pipe", 320, 256))
    frames = sorted((tmp_path / "pipe").glob("*.jpg"))
    assert len(frames) == 15 and (tmp_path / "pipe" / "audio.wav").is_file()
    from PIL import Image

    for frame in frames:
        with Image.open(frame) as image:
            image.verify()
        with Image.open(frame) as image:
            assert image.format == "JPEG" and image.size == (320, 256)


def test_loader_benchmark_numbers(tmp_path):
    shards = bench_loader.write_synthetic_shards(tmp_path / "shards", num_clips=8, shard_size=4)
    result = bench_loader.run(shards, repeats=1)
    assert result["samples"] == 8
    for name in (
        "ceiling",
        "loader_1_worker",
        "loader_2_workers",
        "webdataset_2_workers",
        "frame_loader_2_workers",
        "frame_webdataset_2_workers",
    ):
        assert result[name]["samples_per_s"] > 0 and result[name]["cpu_ms_per_sample"] > 0
    assert result["ratio_1_worker_to_ceiling"] == pytest.approx(
        result["loader_1_worker"]["samples_per_s"] / result["ceiling"]["samples_per_s"], abs=2e-3
    )
    assert result["frame_over_webdataset"] == pytest.approx(
        result["frame_loader_2_workers"]["samples_per_s"] / result["frame_webdataset_2_workers"]["samples_per_s"],
        abs=2e-3,
    )
    assert result["met"] == (
        result["ratio_1_worker_to_ceiling"] >= 0.8
        and result["speedup_2_workers_over_1"] > 1
        and result["clip_over_webdataset"] >= 1
        and result["frame_over_webdataset"] >= 1
    )
    assert bench_loader.section(result).startswith("## 2. Loader")


def test_storage_benchmark_reads_the_same_samples_from_the_s3_server_and_disk(tmp_path):
    shards = bench_loader.write_synthetic_shards(tmp_path / "shards", num_clips=8, shard_size=4)
    result = bench_storage.run(shards, tmp_path / "s3", repeats=1)
    if "skipped" in result:
        pytest.skip(result["skipped"])
    assert result["samples"] == 8 and result["workers"] == 1
    for name in ("local_disk", "s3"):
        assert result[name]["samples_per_s"] > 0 and result[name]["cpu_ms_per_sample"] > 0
    assert result["ratio_s3_to_local"] == pytest.approx(
        result["s3"]["samples_per_s"] / result["local_disk"]["samples_per_s"], abs=2e-3
    )
    assert result["met"] == (result["ratio_s3_to_local"] >= 0.8)
    assert bench_storage.section(result).startswith("## 5. Object storage")


def test_every_loader_baseline_yields_the_loaders_batches(tmp_path):
    """The baselines do the loader's work: the same uint8 frames, labels and texts (eval views, no shuffling)."""
    shards = bench_loader.write_synthetic_shards(tmp_path / "shards", num_clips=4, shard_size=4)
    url = str(shards / "train-000000.tar")
    for mode, texts in (("clip", "transcript"), ("frame", "prompt")):
        data = flat_loader(
            url,
            mode=mode,
            batch_size=4,
            num_workers=0,
            world_size=1,
            rank=0,
            seed=0,
            shuffle=False,
            train=False,
            num_frames=bench_loader.NUM_FRAMES,
            image=ImageSpec(size=bench_loader.IMAGE_SIZE),
            audio=AudioSpec(seconds=0),
            prompt_fn=bench_loader.build_prompt,
        )
        data.set_epoch(0)
        ours = next(iter(data.dataloader))
        theirs = bench_loader.collate(
            [
                bench_loader.clip_sample(s) if mode == "clip" else bench_loader.frame_sample(s)
                for s in webdataset.WebDataset(url, shardshuffle=False)
            ]
        )
        pixels = "frames" if mode == "clip" else "pixel_values"
        assert ours[pixels].dtype == theirs[pixels].dtype == torch.uint8 and ours[pixels].shape == theirs[pixels].shape
        # torch's antialiased bicubic against PIL's: the same filter, off by rounding
        assert (ours[pixels].float() - theirs[pixels].float()).abs().mean() < 0.5
        assert ours[texts] == theirs[texts]
        assert torch.equal(ours["labels"].nan_to_num(-1), theirs["labels"].nan_to_num(-1))
        if mode == "clip":
            assert torch.equal(ours["audio"], theirs["audio"])


def test_in_memory_data_times_every_request_and_skips_like_the_loader():
    batch = {"x": torch.ones(2)}
    data = bench_trainer.InMemoryData(batch, num_batches=5, batch_size=2)
    data.set_epoch(0, skip_batches=2)
    assert [b is batch for b in data.dataloader] == [True] * 3
    assert len(data.request_times) == 4 and data.request_times == sorted(data.request_times)


def test_block_means_skip_warmup_and_average_each_block():
    times = [0.0, 5.0, 6.0, 8.0, 11.0, 15.0]  # steps of 5, 1, 2, 3, 4 s
    assert bench_trainer.block_means(times, warmup=1, blocks=2, block_steps=2) == [1.5, 3.5]
    with pytest.raises(ValueError, match="timed steps"):
        bench_trainer.block_means(times, warmup=2, blocks=2, block_steps=2)


@pytest.mark.slow  # a minute of the benchmark's own plumbing: `make test-slow`, and `make bench` runs it for real
def test_trainer_benchmark_runs_fit_and_the_plain_loop(tmp_path):
    result = bench_trainer.run(tmp_path, warmup=1, blocks=2, block_steps=2, configs=("plain", "fit_zero2"))
    assert result["batch_size"] == 16
    for name in ("plain", "fit_zero2"):
        assert len(result[name]["block_step_ms"]) == 2 and result[name]["processes"] == 1
        assert result[name]["step_ms"] == pytest.approx(sum(result[name]["block_step_ms"]) / 2, abs=0.02)  # median
        assert result[name]["step_ms"] > 0
    assert result["overhead_zero2"] == pytest.approx(
        result["fit_zero2"]["step_ms"] / result["plain"]["step_ms"], abs=1e-3
    )
    assert result["met"] == (result["overhead_zero2"] <= bench_trainer.TARGET)
    assert (tmp_path / "runs" / "fit-zero2" / "export" / "vision" / "config.json").is_file()  # fit ran to the end
    assert "## 3. Trainer overhead" in bench_trainer.section(result)


def test_stage2_benchmark_sees_the_same_clips_both_ways(shards_result, clips, tmp_path):
    result = bench_stage2.run(clips[2] / "emi", tmp_path, repeats=1, batch_size=2)
    assert result["clips"] == 3 and result["samples"] == 4  # two batches of 2, the last one wrapping around
    for name in ("cached", "on_the_fly"):
        assert result[name]["wall_s"] > 0
        assert result[name]["samples_per_s"] == pytest.approx(4 / result[name]["wall_s"], rel=0.01)
    assert result["speedup"] == pytest.approx(result["on_the_fly"]["wall_s"] / result["cached"]["wall_s"], rel=0.02)
    features = json.loads((tmp_path / "features" / "manifest.json").read_text())
    assert features["num_samples"] == 3
    assert bench_stage2.section(result).startswith("## 4. Stage II")


@pytest.mark.slow  # 45 s: `make test-slow`, and before every device session (gpu_e2e.py --dry-run runs it too)
def test_gpu_script_runs_tiny_on_cpu_and_leaves_results_alone():
    before = gpu_stage1.RESULTS.read_bytes() if gpu_stage1.RESULTS.is_file() else None
    out = subprocess.run(
        [sys.executable, "benchmarks/gpu_stage1.py", "--tiny", "--steps", "2", "--profile"],
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "aten::addmm" in out.stdout and "Self CPU time total" in out.stdout  # the --profile table
    result = json.loads(out.stdout[out.stdout.index("{\n") :])
    assert result["model"].startswith("tiny") and result["world_size"] == 1 and result["steps"] == 2
    assert result["samples_per_s_per_gpu"] == pytest.approx(4 * 2 / result["seconds"], rel=0.02)
    config = gpu_stage1.stage1_config(tiny=True)
    model = build_model(config)
    assert result["parameters"] == sum(p.numel() for p in model.parameters())
    assert result["train_gflops_per_sample"] == round(train_flops_per_sample(model, config) / 1e9, 3)
    assert result["peak_memory_gib"] is None and result["mfu"] is None  # no GPU, no peak to divide by
    assert result["achieved_tflops_per_gpu"] > 0
    assert (gpu_stage1.RESULTS.read_bytes() if gpu_stage1.RESULTS.is_file() else None) == before


def test_random_init_overrides_build_vitl_yamls_model_without_downloading():
    config = gpu_stage1.stage1_config(tiny=False)
    assert config.model.pairs == ["vision_text", "audio_text"] and config.data.audio_seconds == 6.0
    with torch.device("meta"):  # the architectures without allocating their 730 M parameters
        model = build_model(config)
    assert model.vision.config.patch_size == 14 and model.audio.config.num_hidden_layers == 24
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 730
    assert round(train_flops_per_sample(model, config) / 1e9) == 1192  # 3 x (162 + 11 + 224) GFLOP


def test_the_batch_sweep_doubles_then_fills_the_memory_a_linear_model_predicts():
    gib = 2**30
    tried = [{"batch_size": 16, "fits": True, "peak_memory_gib": 10.0}]
    assert gpu_stage1.next_batch(tried, 80 * gib, 0.92, 4096) == 32
    tried.append({"batch_size": 32, "fits": True, "peak_memory_gib": 14.0})  # 0.25 GiB per sample, 10 fixed
    assert gpu_stage1.next_batch(tried, 80 * gib, 0.92, 4096) == 64
    tried.append({"batch_size": 64, "fits": True, "peak_memory_gib": 22.0})
    tried.append({"batch_size": 128, "fits": True, "peak_memory_gib": 38.0})
    assert gpu_stage1.next_batch(tried, 80 * gib, 0.92, 4096) == 256  # predicted 70 GiB of the 73.6 allowed
    assert gpu_stage1.next_batch(tried, 80 * gib, 0.92, 200) == 200  # the limit
    tried.append({"batch_size": 256, "fits": True, "peak_memory_gib": 70.0})
    # room: 0.92 * 80 - 70 = 3.6 GiB = 14 more samples; 256 + 14 = 270 -> 264 (a multiple of 8)
    assert gpu_stage1.next_batch(tried, 80 * gib, 0.92, 4096) == 264
    tried.append({"batch_size": 264, "fits": True, "peak_memory_gib": 72.0})
    assert gpu_stage1.next_batch(tried, 80 * gib, 0.92, 4096) is None  # no room for 8 more
    assert gpu_stage1.next_batch(tried, 80 * gib, 0.92, 264) is None
    assert gpu_stage1.next_batch(tried[:1], None, 0.92, 16) is None  # CPU: doubling up to the limit


def test_the_ablation_sweep_time_spans_the_first_cell_start_to_the_last_cell_end(tmp_path):
    """benchmarks/ablation.py times the sweep from its cells' TensorBoard event files: the name holds the creation
    time, the mtime the last write; a resumed cell's second file counts too."""
    for cell, start, end in (
        ("a/seed-0", 1000, 1100),
        ("a/seed-1", 1010, 1300),
        ("b/seed-0", 1200, 1250),
        ("b/seed-0", 1280, 1360),
    ):  # b/seed-0 preempted, then resumed
        event = tmp_path / "cells" / cell / "tb" / f"events.out.tfevents.{start}.host.name.42.0"
        event.parent.mkdir(parents=True, exist_ok=True)
        event.touch()
        os.utime(event, (end, end))
    assert ablation.sweep_minutes(tmp_path) == 6.0  # 1000 .. 1360


def test_sections_this_run_does_not_write_are_kept():
    old = (
        "# Benchmarks\n\n| summary |\n\n## 1. Shard building\n\nold numbers\n\n## GPU: Stage I run one\n\n"
        "| a | 1 |\n\n## 2. Loader\n\nmore\n\n## Learning and ablation\n\ntable\n\n"
        "## GPU: Stage I run two\n\nlast\n"
    )
    assert run.kept_sections(old) == [
        "## GPU: Stage I run one\n\n| a | 1 |\n",
        "## Learning and ablation\n\ntable\n",
        "## GPU: Stage I run two\n\nlast\n",
    ]
    assert run.kept_sections("# Benchmarks\n\n## 1. Shard building\n\n## 4. Stage II: x\n") == []


@pytest.mark.slow  # a minute: `make test-slow`, and before every device session (benchmarks/gpu_e2e.py --dry-run)
def test_the_end_to_end_gpu_script_dry_runs_its_code_path_on_the_cpu(tmp_path):
    """benchmarks/gpu_e2e.py --dry-run: emi synth and shards build, the zero2 batch sweeps, the trainer under
    accelerate launch on the shards and gpu_stage1's ceiling, on the tiny config; the report is written to --out."""
    before = gpu_stage1.RESULTS.read_bytes()
    out = subprocess.run(
        [
            sys.executable,
            "benchmarks/gpu_e2e.py",
            "--dry-run",
            "--out",
            str(tmp_path),
            "--only",
            "sweep-zero2",
            "zero2",
        ],
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads((tmp_path / "e2e.json").read_text())
    assert report["data"]["clips"] == 24 and report["data"]["made_by"].startswith("emi synth + emi shards build")
    for checkpointing in ("off", "on"):
        assert report["sweeps"]["zero2"][checkpointing]["largest_batch"] == 8  # the dry run's limit, by doubling
    run = report["runs"]["zero2"]
    assert run["batch_size"] == 4 and run["workers"] == 2 and run["strategy"] == "zero2"
    real, ceiling = run["real"], run["ceiling"]
    assert real["windows"] == [4, 6] and real["samples_per_s"] > 0 and 0 <= real["data_wait_share"] <= 1
    assert real["tflops_per_device"] > 0 and real["mfu"] is None  # the CPU has no known peak
    assert ceiling["batch_size_per_gpu"] == 4 and ceiling["samples_per_s_per_gpu"] > 0
    assert report["not_run"] == [] and "DEEPSPEED world=1" in (tmp_path / "runs" / "zero2" / "log.txt").read_text()
    text = (tmp_path / "RESULTS-gpu-e2e.md").read_text()
    assert text.startswith(gpu_e2e.HEADING) and "| zero2 | zero2 | no | no | 4 | 2 |" in text
    assert gpu_stage1.RESULTS.read_bytes() == before  # without --results the repository's file is left alone


def test_the_training_spec_holds_every_step_in_one_epoch_and_the_section_replaces_its_predecessor(tmp_path):
    # 12 workers, 25 steps of 100: each worker a slice of ceil(25 / 12) + 1 = 4 batches, 4800 samples: 5 x 1000
    assert gpu_e2e.training_spec("/d", 1000, 25, 100, 12) == "::".join(["/d"] * 5)
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# Benchmarks\n\n## 1. x\n\none\n\n{gpu_e2e.HEADING} (old)\n\nold\n\n## GPU: other\n\nkept\n")
    gpu_e2e.replace_section(results, f"{gpu_e2e.HEADING} (new)\n\nnew\n")
    assert results.read_text() == (
        f"# Benchmarks\n\n## 1. x\n\none\n\n{gpu_e2e.HEADING} (new)\n\nnew\n\n## GPU: other\n\nkept\n"
    )


def test_the_collective_counter_records_payloads_and_who_called(monkeypatch):
    """benchmarks/scaling.py counts every collective with its whole payload, the loss's by the loss's name."""
    import torch.distributed as dist

    from emi.models.losses import gather_features

    for name in scaling.PAYLOAD:  # restored after the test
        if hasattr(dist, name):
            monkeypatch.setattr(dist, name, getattr(dist, name))
    counter = scaling.CollectiveCounter()
    counter.install()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        counter.active = True
        dist.all_reduce(torch.ones(3000))
        dist.all_gather_into_tensor(torch.empty(5000), torch.ones(5000))
        dist.all_reduce(torch.ones(1))
        features = torch.randn(4, 8, requires_grad=True)
        gathered, _ = gather_features(features, features.flip(0), gather_with_grad=True, rank=0, world_size=1)
        gathered.sum().backward()
        counter.active = False
        dist.all_reduce(torch.ones(7))  # not counted
    finally:
        dist.destroy_process_group()
    assert counter.records[:3] == [
        ("all_reduce", 3000, "gradients"),
        ("all_gather_into_tensor", 5000, "parameters"),
        ("all_reduce", 1, "small collectives"),
    ]
    # the loss gathers both sides of the pair, 4 x 8 each, with gradients; the backward sends the used side's
    # gradient back (gloo: a scatter per rank, together the reduce-scatter's payload)
    assert counter.records[3:] == [
        ("all_gather", 32, "loss embeddings"),
        ("all_gather", 32, "loss embeddings"),
        ("scatter", 32, "loss embeddings"),
    ]


def test_the_scaling_model_is_a_ring_per_collective():
    counts = {
        "parameters": 1000,
        "world_size": 2,
        "batch_size": 4,
        "embed_dim": 8,
        "collectives": {
            "gradients": {"elements_per_step": 1000, "calls_per_step": 1, "operations": {"all_reduce": 1000}},
            "parameters": {
                "elements_per_step": 1000,
                "calls_per_step": 1,
                "operations": {"all_gather_into_tensor": 1000},
            },
            "loss embeddings": {
                "elements_per_step": 128,
                "calls_per_step": 4,
                "operations": {"all_gather": 64, "scatter": 64},
            },
        },
    }
    coeff = scaling.coefficients(counts)
    assert coeff["gradients"] == {"per_unit": 1.0, "wire": 2.0, "calls": 1}
    assert coeff["loss embeddings"] == {"per_unit": 2.0, "wire": 1.0, "calls": 4}  # 128 / (2 ranks x 4 x 8)
    assert coeff["small collectives"]["calls"] == 0.0
    model = {"parameters": 10**9, "partitioned_parameters": 10**9, "embed_dim": 8}
    p = scaling.predict("zero2", coeff, counts, model, 64, 1.0, 4, 360.0, 45.0)
    ring, bandwidth, latency = 63 / 64, 45e9, 8e-6  # 64 GPUs: across nodes
    gradients = ring * 2 * 2e9 / bandwidth + 5 * 63 * latency  # bf16 all-reduce, 2e8-element buckets: 5
    parameters = ring * 2e9 / bandwidth + 5 * 63 * latency
    loss = ring * 2 * 64 * 4 * 8 * 2 / bandwidth + 4 * 63 * latency
    assert p["gradients s"] == pytest.approx(gradients) and p["parameters s"] == pytest.approx(parameters)
    assert p["loss embeddings s"] == pytest.approx(loss)
    # ZeRO-2: the reduction hides in the backward (2/3 of the step), the gather after the step does not
    assert p["step_s"] == pytest.approx(1.0 + parameters + loss) and p["efficiency"] == pytest.approx(1 / p["step_s"])
    assert p["step_s_no_overlap"] == pytest.approx(1.0 + gradients + parameters + loss)
