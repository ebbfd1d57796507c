"""End-to-end Stage I on one GPU: clips made by `emi synth`, shards made by `emi shards build`, read by the real loader
into the real trainer (`accelerate launch -m emi.stages.stage1`), against the synthetic-batch ceiling of the same
model and step (`benchmarks/gpu_stage1.py`) measured in the same run.

    python benchmarks/gpu_e2e.py --out $OUT [--budget-s 450] [--clips 1024] [--workers 12] [--only ITEM ...]
    python benchmarks/gpu_e2e.py --dry-run --out /tmp/e2e     (CPU: configs/stage1/tiny.yaml, the same code path)

On a lent GPU machine the working tree arrives without a build step: run it from the repository root with the
pinned packages importable (torch, transformers, accelerate, deepspeed, webdataset, tensorboard, av) and ffmpeg on
the PATH (without ffmpeg or PyAV the clips are written straight into shards by
benchmarks.bench_loader.write_synthetic_shards, and the report says so). Nothing is downloaded:
configs/stage1/vitl.yaml's ViT-L/14 + BERT-base + Wav2Vec2-large are built from config dicts with random weights
(gpu_stage1.RANDOM_INIT), bf16. Everything lands in --out: e2e.json
(rewritten after every measurement, so a run cut short keeps what it measured), RESULTS-gpu-e2e.md (the section)
and runs/ (each trainer run's log.txt and TensorBoard); with --results the section also replaces the earlier one
of its name in benchmarks/RESULTS.md.

The plan, in order of what the targets need, each item started only while --budget-s leaves room for it (estimated
from the items before; the rest is listed as not run):
 1. data: `emi synth` --clips clips and `emi shards build` (short side 256, the builder's default: the frame size
    real shards have) on every core; the training spec lists the shard folder enough times that one epoch covers
    every run, so no epoch boundary (the loader restarting its workers' streams) falls into a measurement
 2. sweep-zero2: the largest batch per GPU that fits, without and with activation checkpointing (gpu_stage1 --sweep,
    while the data is being made; memory only)
 3. the trainer on the real shards and gpu_stage1 on a synthetic batch, both at the same batch, for: zero2; zero2
    compiled; zero2 with activation checkpointing (at its own largest batch); zero3; then sweep-zero3, zero3
    compiled, zero2 with activation checkpointing compiled, zero3 with activation checkpointing (compiled).
A trainer run takes --steps optimizer steps logging every --log-every; its numbers are the medians of the windows
after the first --warmup-steps (compilation, allocator and loader warm-up fall there), from its TensorBoard
telemetry (emi.engine.telemetry). The ceiling runs the same number of steps on one batch held on the GPU.

Targets (stated with the card's name): real-data samples/s >= 0.9 x the ceiling of the same configuration with at
most 12 loader workers; MFU >= 0.40 in bf16 for the best configuration; activation checkpointing at least doubles
the largest batch per GPU.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python benchmarks/gpu_e2e.py` from a checkout, nothing installed

from benchmarks.harness import table  # noqa: E402
from benchmarks.results import write_section  # noqa: E402

HEADING = "GPU: end-to-end Stage I on real shards"
TARGET_FEED, TARGET_MFU, TARGET_BATCH_GAIN, MAX_WORKERS = 0.9, 0.40, 2.0, 12


@dataclass(frozen=True)
class Setup:
    """What one configuration trains with."""

    name: str
    strategy: str
    checkpointing: bool = False
    compiled: bool = False

    def overrides(self, batch_size: int, compile_backend: str) -> list[str]:
        return [
            f"train.strategy={self.strategy}",
            f"train.activation_checkpointing={str(self.checkpointing).lower()}",
            f"train.compile={str(self.compiled).lower()}",
            f"train.compile_backend={compile_backend}",
            f"data.batch_size={batch_size}",
        ]


SETUPS = [
    Setup("zero2", "zero2"),
    Setup("zero2-compile", "zero2", compiled=True),
    Setup("zero2-ac", "zero2", checkpointing=True),
    Setup("zero3", "zero3"),
    Setup("zero3-compile", "zero3", compiled=True),
    Setup("zero2-ac-compile", "zero2", True, True),
    Setup("zero3-ac", "zero3", checkpointing=True),
    Setup("zero3-ac-compile", "zero3", True, True),
]
PLAN = [
    "sweep-zero2",
    "zero2",
    "zero2-compile",
    "zero2-ac",
    "zero3",
    "sweep-zero3",
    "zero3-compile",
    "zero2-ac-compile",
    "zero3-ac",
    "zero3-ac-compile",
]


@dataclass
class Settings:
    """The sizes of a run: the GPU run, or the CPU dry run of the same code path."""

    dry_run: bool
    clips: int
    workers: int
    steps: int
    log_every: int
    warmup_steps: int
    ceiling_steps: int
    first_sweep_batch: int
    sweep_limit: int
    batch_cap: int  # the batch of the runs without activation checkpointing is at most this
    compile_backend: str
    accelerate_config: str

    @classmethod
    def make(cls, args: argparse.Namespace) -> Settings:
        cores = os.cpu_count() or 1
        if args.dry_run:
            return cls(
                dry_run=True,
                clips=args.clips or 24,
                workers=args.workers or 2,
                steps=6,
                log_every=2,
                warmup_steps=2,
                ceiling_steps=3,
                first_sweep_batch=2,
                sweep_limit=8,
                batch_cap=4,
                compile_backend="aot_eager",
                accelerate_config="cpu.yaml",
            )
        return cls(
            dry_run=False,
            clips=args.clips or 1024,
            workers=args.workers or max(1, min(MAX_WORKERS, cores - 2)),  # a core for the trainer, one spare
            steps=args.steps,
            log_every=args.log_every,
            warmup_steps=args.warmup_steps,
            ceiling_steps=15,
            first_sweep_batch=16,
            sweep_limit=4096,
            batch_cap=512,
            compile_backend="inductor",
            accelerate_config="single_node.yaml",
        )


class Report:
    """Every measurement so far, written to --out after each (a run cut short keeps what it measured)."""

    def __init__(self, out: Path, settings: Settings, budget_s: float) -> None:
        self.out, self.settings, self.budget_s = out, settings, budget_s
        self.started = time.monotonic()
        self.data: dict[str, Any] = {
            "settings": asdict(settings),
            "budget_s": budget_s,
            "environment": environment(),
            "runs": {},
            "sweeps": {},
            "not_run": [],
            "seconds": {},
        }

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        (self.out / "e2e.json").write_text(json.dumps(self.data, indent=2) + "\n")
        (self.out / "RESULTS-gpu-e2e.md").write_text(f"## {HEADING}\n\n{section(self.data)}")

    def timed(self, item: str, seconds: float) -> None:
        self.data["seconds"][item] = round(seconds, 1)
        self.save()


def environment() -> dict[str, Any]:
    import torch

    versions = {}
    for package in ("torch", "transformers", "accelerate", "deepspeed", "webdataset"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = None
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "device_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "ffmpeg": shutil.which("ffmpeg") is not None,
        "date": datetime.date.today().isoformat(),
        **versions,
    }


def child_env(dry_run: bool) -> dict[str, str]:
    env = dict(
        os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    if dry_run:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return env


def run_command(command: list[str], log: Path, timeout: float, env: dict[str, str]) -> int | None:
    """Run to the end (exit code) or until `timeout` seconds (None: the whole process group was killed)."""
    with open(log, "w") as output:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return process.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return None


# ------------------------------------------------------------------------------------------------ 1. data


def make_data(out: Path, settings: Settings, env: dict[str, str]) -> dict[str, Any]:
    """Clips and shards on every core; returns where the shards are and how they were made."""
    cores = str(os.cpu_count() or 1)
    shards = out / "data" / "shards"
    if shutil.which("ffmpeg") and importlib.util.find_spec("av") is not None:
        synth = out / "data" / "synth"
        for name, args in (
            ("synth", ["synth", "--out", str(synth), "--clips", str(settings.clips), "--workers", cores]),
            (
                "shards",
                [
                    "shards",
                    "build",
                    "--videos",
                    str(synth / "videos"),
                    "--labels",
                    str(synth / "labels.csv"),
                    "--transcripts",
                    str(synth / "transcripts.csv"),
                    "--out",
                    str(shards),
                    "--workers",
                    cores,
                    "--shard-size",
                    "64",
                ],
            ),
        ):
            code = run_command([sys.executable, "-m", "emi.cli", *args], out / f"{name}.log", 1800, env)
            if code != 0:
                raise RuntimeError(f"emi {name} failed ({code}): see {out / f'{name}.log'}")
        made_by = "emi synth + emi shards build (synthetic 128 px clips, frames stored at short side 256)"
    else:
        from benchmarks.bench_loader import write_synthetic_shards

        write_synthetic_shards(shards, num_clips=settings.clips, shard_size=64)
        made_by = (
            "no ffmpeg (emi synth) or PyAV (emi shards build) on this machine: "
            "benchmarks.bench_loader.write_synthetic_shards (455x256 JPEG frames, 16 kHz audio, the builder's "
            "tar layout)"
        )
    manifest = json.loads((shards / "manifest.json").read_text())
    sizes = [path.stat().st_size for path in shards.glob("*.tar")]
    return {
        "shards": str(shards),
        "made_by": made_by,
        "clips": manifest["num_samples"],
        "mb_per_clip": round(sum(sizes) / manifest["num_samples"] / 1e6, 3),
    }


def training_spec(shards: str, clips: int, steps: int, batch_size: int, workers: int) -> str:
    """The shard folder listed often enough that one epoch holds `steps` batches: every worker gets a whole slice
    of ceil(steps / workers) + 1 batches (the data plan gives each (rank, worker) an equal, batch-aligned slice)."""
    samples = workers * (math.ceil(steps / workers) + 1) * batch_size
    return "::".join([shards] * max(1, math.ceil(samples / clips)))


# ------------------------------------------------------------------------------------------------ 2. sweeps, ceilings


def gpu_stage1(
    args: list[str], out: Path, name: str, timeout: float, settings: Settings, env: dict[str, str]
) -> dict[str, Any]:
    result_file = out / f"{name}.json"
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "gpu_stage1.py"),
        *args,
        "--json",
        str(result_file),
        "--compile-backend",
        settings.compile_backend,
        *(["--tiny"] if settings.dry_run else []),
    ]
    code = run_command(command, out / f"{name}.log", timeout, env)
    if code != 0:
        return {"error": "timed out" if code is None else f"exit code {code}", "log": f"{name}.log"}
    return json.loads(result_file.read_text())


def sweep(
    setup_strategy: str, checkpointing: bool, out: Path, timeout: float, settings: Settings, env: dict[str, str]
) -> dict[str, Any]:
    args = [
        "--sweep",
        "--strategy",
        setup_strategy,
        "--batch-size",
        str(settings.first_sweep_batch),
        "--sweep-limit",
        str(settings.sweep_limit),
        *(["--activation-checkpointing"] if checkpointing else []),
    ]
    return gpu_stage1(args, out, f"sweep-{setup_strategy}{'-ac' if checkpointing else ''}", timeout, settings, env)


def ceiling(
    setup: Setup, batch_size: int, out: Path, timeout: float, settings: Settings, env: dict[str, str]
) -> dict[str, Any]:
    args = [
        "--strategy",
        setup.strategy,
        "--batch-size",
        str(batch_size),
        "--steps",
        str(settings.ceiling_steps),
        "--warmup",
        str(settings.warmup_steps),
        *(["--activation-checkpointing"] if setup.checkpointing else []),
        *(["--compile"] if setup.compiled else []),
    ]
    return gpu_stage1(args, out, f"ceiling-{setup.name}", timeout, settings, env)


# ------------------------------------------------------------------------------------------------ 3. the trainer


def trainer(
    setup: Setup, batch_size: int, spec: str, out: Path, timeout: float, settings: Settings, env: dict[str, str]
) -> dict[str, Any]:
    """The real Stage I trainer under accelerate launch on the shards; its telemetry after the warm-up windows."""
    from benchmarks.gpu_stage1 import random_init_overrides

    config = (
        ["--config", "configs/stage1/tiny.yaml"]
        if settings.dry_run
        else ["--config", "configs/stage1/vitl.yaml", *random_init_overrides()]
    )
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configs" / "accelerate" / settings.accelerate_config),
        "--num_processes",
        "1",
        "-m",
        "emi.stages.stage1",
        *config,
        *setup.overrides(batch_size, settings.compile_backend),
        f"data.train={spec}",
        "data.val=null",
        f"data.num_workers={settings.workers}",
        f"train.max_steps={settings.steps}",
        f"train.log_every={settings.log_every}",
        "train.epochs=1",
        "train.save=false",
        f"run.output_dir={out / 'runs'}",
        f"run.name={setup.name}",
    ]
    code = run_command(command, out / f"trainer-{setup.name}.log", timeout, env)
    if code != 0:
        return {"error": "timed out" if code is None else f"exit code {code}", "log": f"trainer-{setup.name}.log"}
    return telemetry(out / "runs" / setup.name, settings.warmup_steps)


def telemetry(run_dir: Path, warmup_steps: int) -> dict[str, Any]:
    """Medians over the logging windows after `warmup_steps` of the trainer's step telemetry."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, dict[int, float]] = {}
    for events in sorted((run_dir / "tb").glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            series.setdefault(tag.removeprefix("train/"), {}).update(
                {event.step: event.value for event in accumulator.Scalars(tag)}
            )
    windows = sorted(step for step in series.get("samples_per_s", {}) if step > warmup_steps)
    if not windows:
        return {"error": f"no telemetry after step {warmup_steps} in {run_dir}"}

    def median(name: str) -> float | None:
        values = [series[name][step] for step in windows if step in series.get(name, {})]
        return statistics.median(values) if values else None

    result = {
        name: median(name)
        for name in ("samples_per_s", "data_wait_share", "step_s", "data_wait_s", "mfu", "tflops_per_device")
    }
    peak = series.get("peak_memory_gib", {})
    result["peak_memory_gib"] = max(peak.values()) if peak else None
    result["windows"] = windows
    return result


# ------------------------------------------------------------------------------------------------ the plan


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where everything is written ($OUT on the device)")
    parser.add_argument("--dry-run", action="store_true", help="CPU: tiny config, tiny sizes, the same code path")
    parser.add_argument("--budget-s", type=float, default=None, help="start no item after this (default 450, dry 300)")
    parser.add_argument("--clips", type=int, default=None, help="clips to synthesise (default 1024, dry 24)")
    parser.add_argument(
        "--workers", type=int, default=None, help=f"loader workers (default min({MAX_WORKERS}, cores - 2), dry 2)"
    )
    parser.add_argument("--steps", type=int, default=25, help="optimizer steps per trainer run")
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--warmup-steps", type=int, default=10, help="steps left out of the numbers")
    parser.add_argument("--only", nargs="+", choices=PLAN, default=None, help="these plan items only")
    parser.add_argument("--results", action="store_true", help="also put the section into benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    settings = Settings.make(args)
    budget = args.budget_s or (300.0 if args.dry_run else 450.0)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = child_env(settings.dry_run)
    report = Report(out, settings, budget)
    plan = [item for item in PLAN if args.only is None or item in args.only]
    by_name = {setup.name: setup for setup in SETUPS}

    # 1 and 2: the data on every core while the first sweep measures memory on the GPU
    begin = time.monotonic()
    background = None
    if "sweep-zero2" in plan:
        background = subprocess.Popen(
            [sys.executable, "-c", SWEEP_BOTH, str(out), json.dumps(asdict(settings)), "zero2", str(budget)],
            cwd=REPO,
            env=env,
        )
    report.data["data"] = make_data(out, settings, env)
    report.timed("data", time.monotonic() - begin)
    if background is not None:
        background.wait()
        report.data["sweeps"]["zero2"] = json.loads((out / "sweep-zero2-both.json").read_text())
        report.timed("sweep-zero2 (alongside the data)", time.monotonic() - begin)

    batch, batch_ac = batches(report.data["sweeps"].get("zero2"), settings)
    report.data["batch"], report.data["batch_checkpointing"] = batch, batch_ac
    spec = training_spec(
        report.data["data"]["shards"],
        report.data["data"]["clips"],
        settings.steps,
        max(batch, batch_ac),
        settings.workers,
    )
    costs: list[float] = []
    for item in plan:
        if item == "sweep-zero2":
            continue
        estimate = statistics.median(costs) if costs else 0.0
        if report.elapsed() + estimate > budget:
            report.data["not_run"].append(item)
            report.save()
            continue
        begin = time.monotonic()
        timeout = budget - report.elapsed() + 60  # an item may run a minute past the budget, no more
        if item.startswith("sweep-"):
            strategy = item.removeprefix("sweep-")
            report.data["sweeps"][strategy] = {
                "off": sweep(strategy, False, out, timeout / 2, settings, env),
                "on": sweep(strategy, True, out, timeout / 2, settings, env),
            }
        else:
            setup = by_name[item]
            size = batch_ac if setup.checkpointing else batch
            real = trainer(setup, size, spec, out, timeout, settings, env)
            synthetic = ceiling(setup, size, out, budget - report.elapsed() + 60, settings, env)
            report.data["runs"][item] = {
                **asdict(setup),
                "batch_size": size,
                "workers": settings.workers,
                "real": real,
                "ceiling": synthetic,
            }
        costs.append(time.monotonic() - begin)
        report.timed(item, costs[-1])
    report.save()
    if args.results:
        write_section(HEADING, section(report.data))
    print(section(report.data))


# The zero2 sweeps, without and with activation checkpointing, one after the other in a child process, so that the
# data can be made at the same time (the sweeps measure memory; their one timed step per batch is for information).
SWEEP_BOTH = """
import json, sys
from pathlib import Path
from benchmarks.gpu_e2e import Settings, child_env, sweep
out, settings, strategy = Path(sys.argv[1]), Settings(**json.loads(sys.argv[2])), sys.argv[3]
budget = float(sys.argv[4])
env = child_env(settings.dry_run)
both = {"off": sweep(strategy, False, out, budget / 3, settings, env),
        "on": sweep(strategy, True, out, budget / 3, settings, env)}
(out / f"sweep-{strategy}-both.json").write_text(json.dumps(both, indent=2))
"""


def batches(sweeps: dict[str, Any] | None, settings: Settings) -> tuple[int, int]:
    """The batch of the runs without and with activation checkpointing: 90% of the largest batch that fits (the
    real trainer holds a little more than the synthetic step: the next batch on its way in, telemetry), a multiple
    of 8, at most the cap (and twice the cap with checkpointing: the loader's batches in flight, 24 of them with
    12 workers, each ~0.5 MB per sample of shared memory); without a sweep, the cap and twice the batch."""

    def pick(result: dict[str, Any] | None, cap: int) -> int | None:
        largest = (result or {}).get("largest_batch")
        if not largest:
            return None
        return min(cap, max(8, int(0.9 * largest) // 8 * 8)) if not settings.dry_run else min(cap, largest)

    batch = pick((sweeps or {}).get("off"), settings.batch_cap) or settings.batch_cap
    batch_ac = pick((sweeps or {}).get("on"), 2 * settings.batch_cap) or 2 * batch
    return batch, batch_ac


# ------------------------------------------------------------------------------------------------ the section


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def section(data: dict[str, Any]) -> str:
    env, settings = data["environment"], data["settings"]
    device = env["device"]
    lines = [
        f"Measured {env['date']} on "
        f"{device}{'' if env['device_memory_gib'] is None else ' ' + str(env['device_memory_gib']) + ' GiB'}"
        f"{', DRY RUN on the CPU: tiny config, numbers mean nothing' if settings['dry_run'] else ''}.",
        "",
    ]
    made = data.get("data", {})
    lines += [
        "`benchmarks/gpu_e2e.py`: "
        f"{made.get('clips', '?')} clips ({made.get('made_by', 'not made yet')}, {made.get('mb_per_clip', '?')} MB "
        "per clip in the shards, in the page cache), read by the real loader (`data.num_workers` "
        f"{settings['workers']}, frame_audio mode: one frame and the audio window per sample) into the real Stage I "
        "trainer (`accelerate launch -m emi.stages.stage1`, one process) with "
        + (
            "configs/stage1/tiny.yaml"
            if settings["dry_run"]
            else "configs/stage1/vitl.yaml's ViT-L/14 + BERT-base + Wav2Vec2-large built from configs "
            "(random init), bf16"
        )
        + f"; {settings['steps']} optimizer steps per run, the medians of the telemetry windows "
        f"(every {settings['log_every']} steps) after step {settings['warmup_steps']}. Ceiling: "
        "`benchmarks/gpu_stage1.py`, the same model, loss and train_step on one synthetic batch held on the GPU, "
        f"{settings['ceiling_steps']} steps after {settings['warmup_steps']}. MFU: model FLOPs (emi.models.flops, "
        "3 x forward, recomputation not counted) over the dense bf16 peak. "
        f"torch {env['torch']}, transformers {env['transformers']}, accelerate {env['accelerate']}, "
        f"deepspeed {env['deepspeed']}; {env['cpu_cores']} CPU cores.",
        "",
    ]
    rows = []
    for name, run in data["runs"].items():
        real, synthetic = run["real"], run["ceiling"]
        ratio = None
        if real.get("samples_per_s") and synthetic.get("samples_per_s_per_gpu"):
            ratio = real["samples_per_s"] / synthetic["samples_per_s_per_gpu"]
        rows.append(
            [
                name,
                run["strategy"],
                "yes" if run["checkpointing"] else "no",
                "yes" if run["compiled"] else "no",
                run["batch_size"],
                run["workers"],
                _fmt(real.get("samples_per_s"), 4),
                _fmt(synthetic.get("samples_per_s_per_gpu"), 4),
                _fmt(ratio),
                _fmt(real.get("data_wait_share")),
                _fmt(real.get("mfu")),
                _fmt(synthetic.get("mfu")),
                _fmt(real.get("peak_memory_gib")),
                real.get("error") or synthetic.get("error") or "",
            ]
        )
    lines += [
        table(
            [
                "run",
                "strategy",
                "activation checkpointing",
                "compiled",
                "batch per GPU",
                "loader workers",
                "samples/s per GPU (real)",
                "ceiling samples/s (synthetic)",
                "real / ceiling",
                "data-wait share",
                "MFU (real)",
                "MFU (ceiling)",
                "peak memory GiB (real)",
                "error",
            ],
            rows,
        ),
        "",
    ]
    sweep_rows = []
    for strategy, both in data["sweeps"].items():
        for key, result in both.items():
            tried = ", ".join(
                f"{t['batch_size']}{'' if t['fits'] else ' (out of memory)'}" for t in result.get("tried", [])
            )
            at_largest = next(
                (
                    t["peak_memory_gib"]
                    for t in result.get("tried", [])
                    if t["batch_size"] == result.get("largest_batch")
                ),
                None,
            )
            sweep_rows.append(
                [
                    strategy,
                    "yes" if key == "on" else "no",
                    _fmt(result.get("largest_batch")),
                    _fmt(at_largest),
                    tried or result.get("error", ""),
                ]
            )
    if sweep_rows:
        lines += [
            "Largest batch per GPU (`gpu_stage1.py --sweep`: doubling, then a linear model of peak memory, up to "
            "92% of the device's memory):",
            "",
            table(
                ["strategy", "activation checkpointing", "largest batch", "peak GiB at it", "batches tried"], sweep_rows
            ),
            "",
        ]
    lines += ["Targets:", "", table(["target", "measured", "met"], targets(data)), ""]
    if data["not_run"]:
        lines += [f"Not run within the {data['budget_s']:.0f} s budget: {', '.join(data['not_run'])}.", ""]
    seconds = ", ".join(f"{item} {value} s" for item, value in data["seconds"].items())
    lines += [f"Time: {seconds}; {data.get('elapsed_s', 0)} s in all.", ""]
    return "\n".join(lines)


def targets(data: dict[str, Any]) -> list[list[str]]:
    verdict = {True: "yes", False: "**no**", None: "not measured"}
    if data["settings"]["dry_run"]:
        verdict = {True: "dry run", False: "dry run", None: "dry run"}
    ratios = [
        run["real"]["samples_per_s"] / run["ceiling"]["samples_per_s_per_gpu"]
        for run in data["runs"].values()
        if run["real"].get("samples_per_s") and run["ceiling"].get("samples_per_s_per_gpu")
    ]
    workers = data["settings"]["workers"]
    feed = (min(ratios) >= TARGET_FEED and workers <= MAX_WORKERS) if ratios else None
    mfus = {name: run["real"]["mfu"] for name, run in data["runs"].items() if run["real"].get("mfu") is not None}
    best = max(mfus, key=mfus.get) if mfus else None
    gains = []
    for both in data["sweeps"].values():
        off, on = both.get("off", {}).get("largest_batch"), both.get("on", {}).get("largest_batch")
        if off and on:
            gains.append(on / off)
    return [
        [
            f"real / ceiling >= {TARGET_FEED} in every configuration, <= {MAX_WORKERS} workers ({workers} used)",
            f"lowest {min(ratios):.3f}" if ratios else "-",
            verdict[feed],
        ],
        [
            f"MFU >= {TARGET_MFU} (bf16, the trainer on real shards, best configuration)",
            f"{mfus[best]:.3f} ({best})" if best else "-",
            verdict[mfus[best] >= TARGET_MFU if best else None],
        ],
        [
            f"activation checkpointing x{TARGET_BATCH_GAIN:g} the largest batch",
            ", ".join(f"{gain:.2f}x" for gain in gains) or "-",
            verdict[min(gains) >= TARGET_BATCH_GAIN if gains else None],
        ],
    ]


if __name__ == "__main__":
    main()
