"""Shared test utilities: synthetic shards, launching trainers as real processes, reading TensorBoard logs."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import psutil
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from emi.data import DataInfo, DecodeSpec, LoaderSpec, Sampling, Workers, build_loader
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


def flat_loader(shards, manifest=None, **settings) -> DataInfo:
    """build_loader with its settings as one flat set of keywords: the fields of DecodeSpec, Sampling and Workers."""
    parts = [{name: value for name, value in settings.items() if name in {f.name for f in fields(group)}}
             for group in (DecodeSpec, Sampling, Workers)]
    unknown = set(settings) - {name for part in parts for name in part}
    assert not unknown, f"not a loader setting: {sorted(unknown)}"
    if "label_names" in parts[0]:
        parts[0]["label_names"] = tuple(parts[0]["label_names"])
    return build_loader(shards, LoaderSpec(DecodeSpec(**parts[0]), Sampling(**parts[1]), Workers(**parts[2])), manifest)


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


def wait_until(condition: Callable[[], object], timeout_s: float, what: str, alive: subprocess.Popen | None = None):
    """Poll `condition` until it returns something true (returned), failing after `timeout_s` seconds or as soon as
    `alive` (a process the condition waits on) has ended."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"{what}: the process ended first (exit code {alive.returncode})")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.02)
    return value


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process | None:
    """The process of `rank` among the launcher's descendants (the one whose parent is not of that rank: not its
    dataloader workers), None while it has not started."""
    def rank_of(process: psutil.Process) -> str | None:
        try:
            return process.environ().get("RANK")
        except psutil.Error:  # ended meanwhile, or not ours to read
            return None

    try:
        descendants = psutil.Process(launcher.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    return next((process for process in descendants
                 if rank_of(process) == str(rank) and rank_of(process.parent()) != str(rank)), None)


@dataclass
class HeldBackRun:
    returncode: int
    output: str  # stdout and stderr, interleaved
    released_at: str  # the output when the held rank was let go


def launch_holding_back(args: list[str], held_rank: int, hold_when: Callable[[], object], release_when: str,
                        log: Path, num_processes: int = 2, timeout_s: float = 600,
                        before_release: Callable[[], None] | None = None) -> HeldBackRun:
    """`accelerate launch -m ARGS` on `num_processes` ranks, with `held_rank` stopped (SIGSTOP) once `hold_when()`
    is true (it is mid-way through its share: past the process group's start, which needs every rank) until the
    output shows `release_when` (what the other ranks print once they wait for it); then `before_release()` runs
    (the test's look at the world while the rank is still held) and the rank continues. Returns the exit code and
    the output, which `log` (a file) holds too."""
    with open(log, "w") as out:
        launcher = subprocess.Popen(launch_command("-m", args, num_processes), cwd=REPO, env=cpu_env(), stdout=out,
                                    stderr=subprocess.STDOUT)
    try:
        held = wait_until(lambda: rank_process(launcher, held_rank), timeout_s, f"rank {held_rank} to start",
                          launcher)
        wait_until(hold_when, timeout_s, f"rank {held_rank} to reach the point where it is held", launcher)
        held.suspend()
        released_at = wait_until(lambda: release_when in (text := log.read_text()) and text, timeout_s,
                                 f"{release_when!r} in the output", launcher)
        if before_release is not None:
            before_release()
        held.resume()
        launcher.wait(timeout=timeout_s)
    except AssertionError as err:
        raise AssertionError(f"{err}; output:\n{log.read_text()[-6000:]}") from None
    finally:
        if launcher.poll() is None:
            for process in psutil.Process(launcher.pid).children(recursive=True):
                process.kill()
            launcher.kill()
            launcher.wait()
    return HeldBackRun(launcher.returncode, log.read_text(), released_at)


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
