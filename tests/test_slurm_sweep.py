"""`emi sweep` on the local two-node Slurm cluster: two tiny Stage II cells as one submitit job array, one of them
requeued mid-run with `scontrol requeue` (what preemption does); the command waits for the requeued cell to resume
and finish, then writes the complete table."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import REPO
from slurm_cluster import job_field

SWEEP_TIMEOUT_S = 420
FIRST_CHECKPOINT = 4  # the requeue waits for a checkpoint at least this far: mid-run (72 steps in all)


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in run_dir.glob("checkpoints/step-*/trainer_state.json"))


@pytest.mark.slurm
def test_sweep_fills_a_job_array_and_a_requeued_cell_resumes_before_the_table(
    cluster: dict[str, str], tiny_features: dict[str, Path], tmp_path: Path
) -> None:  # noqa: F811
    path = tmp_path / "sweep.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "slurm",
                "output_dir": str(tmp_path),
                "base": "configs/stage2/tiny.yaml",
                "data": {"synth": {"train": str(tiny_features["train"]), "val": str(tiny_features["val"])}},
                "overrides": {
                    "train.epochs": 6,
                    "data.batch_size": 4,
                    "train.checkpoint_every": 4,
                    "train.log_every": 1,
                },
                "grid": {"model.fusion": ["qam", "mean"]},
                "top_k": 2,
                "slurm": {"gpus_per_node": 0, "cpus_per_node": 1, "time": 30, "parallelism": 2},
            }
        )
    )
    folder = tmp_path / "slurm"
    sweep = subprocess.Popen(
        [sys.executable, "-m", "emi.cli", "sweep", "--config", str(path)],
        cwd=REPO,
        env=cluster,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    requeued = folder / "cells" / "fusion-qam"
    try:
        deadline = time.monotonic() + SWEEP_TIMEOUT_S
        while max(checkpoint_steps(requeued), default=0) < FIRST_CHECKPOINT:
            assert sweep.poll() is None and time.monotonic() < deadline, "no checkpoint of fusion-qam came"
            time.sleep(0.2)
        job = json.loads((folder / "jobs.json").read_text())["fusion-qam"]
        subprocess.run(["scontrol", "requeue", job], env=cluster, timeout=30, check=True)
        out, _ = sweep.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if sweep.poll() is None:
            sweep.kill()
            subprocess.run(["scancel", "--name=emi-sweep-slurm"], env=cluster, timeout=30)
    assert sweep.returncode == 0, out

    array = job.split("_")[0]
    assert re.search(rf"submitted 2 cells to Slurm as job array {array} \(at most 2 at once\)", out), out
    assert json.loads((folder / "jobs.json").read_text()) == {"fusion-qam": f"{array}_0", "fusion-mean": f"{array}_1"}
    assert (job_field(cluster, job, "JobState"), job_field(cluster, job, "Restarts")) == ("COMPLETED", "1")
    assert job_field(cluster, f"{array}_1", "Restarts") == "0"
    log = (requeued / "log.txt").read_text()
    stopped = re.search(r"stopped by signal 15 at step (\d+); checkpoint saved", log)
    resumed = re.search(rf"resumed from {requeued}/checkpoints/step-(\d{{8}})", log)
    assert stopped and resumed and FIRST_CHECKPOINT <= int(resumed.group(1)) < 72, log
    assert "done: 72 steps" in log and log.index("done") > log.index("resumed from")

    cells = list(csv.DictReader((folder / "cells.csv").read_text().splitlines()))
    assert [(row["cell"], row["status"]) for row in cells] == [("fusion-qam", "finished"), ("fusion-mean", "finished")]
    for row in cells:
        best = json.loads((folder / "cells" / row["cell"] / "best" / "trainer.json").read_text())
        assert float(row["mean_pearson"]) == pytest.approx(best["mean_pearson"])
    assert f"| fusion-qam | synth | model.fusion=qam | 1/1 | {float(cells[0]['mean_pearson']):.4f} |" in out
    ranked = sorted(cells, key=lambda row: -float(row["mean_pearson"]))
    assert json.loads((folder / "ensemble.json").read_text())["members"] == [row["cell"] for row in ranked]
