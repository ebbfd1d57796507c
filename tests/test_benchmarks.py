"""Every benchmark runs on tiny inputs and returns well-formed, self-consistent numbers (never a speed check)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import ablation, gpu_e2e, gpu_stage1, harness, results, run, scaling
from emi.stages.stage1 import build_model, train_flops_per_sample

from helpers import REPO, cpu_env, free_port


def test_table_is_markdown():
    assert harness.table(["x", "y"], [[1, "a"], [2.5, "b"]]) == "| x | y |\n|---|---|\n| 1 | a |\n| 2.5 | b |"


def test_a_section_replaces_its_own_heading_and_keeps_every_other(tmp_path):
    path = tmp_path / "RESULTS.md"
    results.write_section("1. Shard building", "first numbers", path)
    assert path.read_text() == results.PREAMBLE + "## 1. Shard building\n\nfirst numbers\n"
    results.write_section("GPU: a card", "| a | 1 |", path)
    results.write_section("Summary", "the table", path, first=True)
    results.write_section("1. Shard building", "new numbers\n\nin two paragraphs", path)
    results.write_section("Summary", "the new table", path, first=True)
    assert path.read_text() == results.PREAMBLE + (
        "## Summary\n\nthe new table\n\n## 1. Shard building\n\nnew numbers\n\nin two paragraphs\n\n"
        "## GPU: a card\n\n| a | 1 |\n"
    )
    assert list(results.sections(path.read_text())) == ["Summary", "1. Shard building", "GPU: a card"]


def test_make_bench_writes_each_section_and_keeps_the_summary_of_the_last_full_run(tmp_path, capsys):
    out = tmp_path / "RESULTS.md"
    results.write_section(run.SUMMARY, "the last full run's table", out)
    assert run.main(["--only", "stage2", "--quick", "--out", str(out)]) == 0
    written = results.sections(out.read_text())
    heading = run.BENCHMARKS["stage2"][0]
    assert list(written) == [run.SUMMARY, heading]
    assert "the last full run's table" in written[run.SUMMARY]  # a partial run leaves the summary alone
    assert "`python -m benchmarks.bench_stage2`" in written[heading] and "$" not in written[heading]
    assert "Stage II epoch, cached features / on the fly" in capsys.readouterr().out  # the summary, printed


@pytest.mark.slow  # 45 s: `make test-slow`, and before every device session (gpu_e2e.py --dry-run runs it too)
def test_gpu_script_runs_tiny_on_cpu_and_leaves_results_alone():
    before = results.RESULTS.read_bytes() if results.RESULTS.is_file() else None
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
    assert (results.RESULTS.read_bytes() if results.RESULTS.is_file() else None) == before


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


@pytest.mark.slow  # a minute: `make test-slow`, and before every device session (benchmarks/gpu_e2e.py --dry-run)
def test_the_end_to_end_gpu_script_dry_runs_its_code_path_on_the_cpu(tmp_path):
    """benchmarks/gpu_e2e.py --dry-run: emi synth and shards build, the zero2 batch sweeps, the trainer under
    accelerate launch on the shards and gpu_stage1's ceiling, on the tiny config; the report is written to --out."""
    before = results.RESULTS.read_bytes()
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
    assert text.startswith(f"## {gpu_e2e.HEADING}\n\nMeasured ") and "| zero2 | zero2 | no | no | 4 | 2 |" in text
    assert results.RESULTS.read_bytes() == before  # without --results the repository's file is left alone


def test_the_training_spec_holds_every_step_in_one_epoch():
    # 12 workers, 25 steps of 100: each worker a slice of ceil(25 / 12) + 1 = 4 batches, 4800 samples: 5 x 1000
    assert gpu_e2e.training_spec("/d", 1000, 25, 100, 12) == "::".join(["/d"] * 5)


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
