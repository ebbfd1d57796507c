"""Shared test utilities: synthetic shards, launching trainers as real processes, reading TensorBoard logs."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from emi.shards.build import build_shards
from emi.synth import synthesize

REPO = Path(__file__).resolve().parents[1]
GRID = REPO / "tests" / "data" / "grid"  # 8 real GRID talking-face clips (CC BY 4.0, see its README.md)
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


def synthetic_split(root: Path, split: str, clips: int, seed: int, frame_size: int = 64,
                    shard_size: int = 16, **corruption) -> Path:
    """Synthesise `clips` mp4 clips and pack them into `root/shards/<split>`; returns the shard folder."""
    source = root / "synth" / split
    synthesize(out=source, clips=clips, seed=seed, workers=2, **corruption)
    out = root / "shards" / split
    summary = build_shards(videos=source / "videos", labels=source / "labels.csv", out=out, split=split,
                           frame_size=frame_size, shard_size=shard_size, workers=2,
                           transcripts=source / "transcripts.csv")
    assert summary.num_failed == 0, summary.describe()
    return out


def cpu_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def launch_command(script: str, args: list[str], num_processes: int = 2) -> list[str]:
    """`accelerate launch` of a script in the repository, or of a module when `script` is "-m"."""
    target = ["-m"] if script == "-m" else [str(REPO / script)]
    return [*ACCELERATE, "--config_file", str(REPO / "configs/accelerate/cpu.yaml"),
            "--num_processes", str(num_processes), "--main_process_port", str(free_port()), *target, *args]


def free_port() -> int:
    """A port nobody listens on now, so tests do not meet other jobs on torch's default 29500."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(script: str, args: list[str], num_processes: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a training entry point under `accelerate launch` with gloo on the CPU; fail with its log on error."""
    result = subprocess.run(launch_command(script, args, num_processes), cwd=REPO, env=cpu_env(),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (f"{script} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                                    f"{result.stderr[-8000:]}")
    return result


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a TensorBoard scalar, over every event file of the run (resumed runs have several)."""
    points: dict[int, float] = {}
    for events in sorted((run_dir / "tb").glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            points.update({event.step: event.value for event in accumulator.Scalars(tag)})
    return sorted(points.items())


def exported(run_dir: Path) -> dict:
    """Every tensor a Stage I run exported (encoders and projection heads), keyed by file and name."""
    weights = {}
    for encoder in ("vision", "text", "audio"):
        for name, tensor in load_file(str(run_dir / "export" / encoder / "model.safetensors")).items():
            weights[f"{encoder}.{name}"] = tensor
    for name, tensor in load_file(str(run_dir / "export" / "projection.safetensors")).items():
        weights[f"projection.{name}"] = tensor
    return weights
