"""Shard building as a Slurm job array (slurm/shards.sh) on the local two-node cluster: 4 tasks over the GRID clips,
synthetic clips and bad inputs, one task cancelled mid-build; the merge job names it (exit 3), the re-run task keeps
its complete shards, and after the second merge the folder is byte for byte the single-process build."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from emi import EMI_EMOTIONS
from emi.shards.build import build_shards
from emi.synth import synthesize

from helpers import GRID, REPO
from slurm_cluster import FINAL_STATES, job_field

TIMEOUT_S = 300
KILLED = 2


def inputs(root: Path) -> tuple[Path, Path]:
    """GRID clips, synthetic clips and bad inputs in one folder, and their labels CSV (one bad row, one row
    naming no file)."""
    synthesize(out=root / "synth", clips=6, seed=5, workers=2)
    videos = root / "videos"
    shutil.copytree(root / "synth" / "videos", videos)
    for clip in GRID.glob("*.mpg"):
        shutil.copy(clip, videos)
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "notes.mp4").write_text("not a video\n")
    with open(root / "synth" / "labels.csv") as file:
        rows = list(csv.DictReader(file))
    rows += [{"Filename": clip.name, **{name: "0.5" for name in EMI_EMOTIONS}} for clip in sorted(GRID.glob("*.mpg"))]
    rows += [
        {"Filename": name, **{label: "0.25" for label in EMI_EMOTIONS}}
        for name in ("empty.mp4", "notes.mp4", "missing.mp4")
    ]
    rows[0] = {**rows[0], "Joy": "nan"}
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["Filename", *EMI_EMOTIONS])
        writer.writeheader()
        writer.writerows({key: row[key] for key in ["Filename", *EMI_EMOTIONS]} for row in rows)
    return videos, labels


def wait_for(env: dict[str, str], job: str, what: str) -> str:
    deadline = time.monotonic() + TIMEOUT_S
    while (state := job_field(env, job, "JobState")) not in FINAL_STATES:
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job], env=env, timeout=30)
            pytest.fail(f"{what} (job {job}) still {state} after {TIMEOUT_S}s")
        time.sleep(0.2)
    return f"{state} {job_field(env, job, 'ExitCode')}"


def submit(env: dict[str, str], logs: Path, array: str, args: list[str]) -> str:
    result = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--array={array}",
            "--cpus-per-task=1",
            f"--chdir={REPO}",
            f"--output={logs}/shards-%A_%a.out",
            "slurm/shards.sh",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def merge_job(logs: Path, array_job: str) -> str:
    """The merge job the array's first task submitted, from its log."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        for log in logs.glob(f"shards-{array_job}_*.out"):
            found = re.search(r"submitted the merge: job (\d+)", log.read_text())
            if found:
                return found.group(1)
        assert time.monotonic() < deadline, f"no merge job submitted by array {array_job}"
        time.sleep(0.2)


@pytest.mark.slurm
def test_array_build_with_a_cancelled_task_merges_into_the_single_process_build(
    cluster: dict[str, str], tmp_path: Path
) -> None:  # noqa: F811
    videos, labels = inputs(tmp_path)
    args = ["--videos", str(videos), "--labels", str(labels), "--shard-size", "1", "--frame-size", "64"]
    reference = tmp_path / "reference"
    single = build_shards(videos=videos, labels=labels, out=reference, shard_size=1, frame_size=64, workers=2)
    assert single.num_failed == 4  # the NaN row, the row without a file, the empty and the text file

    out, logs = tmp_path / "array", tmp_path / "logs"
    logs.mkdir()
    array = submit(cluster, logs, "0-3", [*args, "--out", str(out)])
    partial = out / ".emi-tasks" / f"task-{KILLED:05d}-of-00004.json"
    deadline = time.monotonic() + TIMEOUT_S
    while not (partial.exists() and json.loads(partial.read_text())["shards"]):  # one shard built, more to come
        assert time.monotonic() < deadline and job_field(cluster, f"{array}_{KILLED}", "JobState") not in FINAL_STATES
        time.sleep(0.05)
    subprocess.run(["scancel", f"{array}_{KILLED}"], env=cluster, timeout=30, check=True)
    merge = merge_job(logs, array)
    ended = wait_for(cluster, merge, "the first merge")
    merged = (logs / f"emi-shards-merge-{merge}.out").read_text()
    assert ended == "FAILED 3:0", merged
    assert f"task {KILLED}: incomplete" in merged and "--num-tasks 4" in merged, merged
    assert not (out / "manifest.json").exists()
    for task in range(4):
        state = wait_for(cluster, f"{array}_{task}", f"task {task}")
        assert state == ("CANCELLED 0:15" if task == KILLED else "FAILED 3:0"), state  # 3: bad inputs in every task

    rerun = submit(cluster, logs, str(KILLED), [*args, "--out", str(out), "--num-tasks", "4"])
    assert wait_for(cluster, f"{rerun}_{KILLED}", "the re-run task") == "FAILED 3:0"
    rerun_log = (logs / f"shards-{rerun}_{KILLED}.out").read_text()
    kept = re.search(r"task 2 of 4: \d+ samples in \d+ train shard\(s\) .* \((\d+) written, (\d+) kept", rerun_log)
    assert kept and int(kept.group(2)) >= 1, rerun_log  # its complete shards were kept
    merge = merge_job(logs, rerun)
    ended = wait_for(cluster, merge, "the second merge")
    merged = (logs / f"emi-shards-merge-{merge}.out").read_text()
    assert ended == "FAILED 3:0" and "merged 4 task(s)" in merged and "4 clip(s) not built" in merged, merged

    built = {path.name: path.read_bytes() for path in out.iterdir() if not path.name.startswith(".")}
    assert built == {path.name: path.read_bytes() for path in reference.iterdir() if not path.name.startswith(".")}
