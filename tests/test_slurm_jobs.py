"""The batch scripts (slurm/stage1.sh) and the submitit launcher (emi.launch) on the local two-node Slurm cluster:
tiny Stage I runs on 2 nodes x 1 process (gloo) that train, log and export, and that survive `scontrol requeue`,
the time-limit warning (SIGUSR1) and submitit's preemption signal (SIGUSR2) by checkpointing, requeueing
themselves and ending with the weights of the uninterrupted run; and a 2-node job requeued onto one node, which
finishes its epochs on one process with every sample trained on once per epoch."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from emi.formats.samples import read_run_records

from helpers import REPO, exported, scalars
from slurm_cluster import FINAL_STATES, job_field

TINY = "configs/stage1/tiny.yaml"
EPOCHS = 6
STEPS = EPOCHS * 48 // (8 * 2)  # 48 clips / (batch 8 x 2 ranks) = 3 steps per epoch
FIRST_CHECKPOINT = 4  # the interruptions wait for a checkpoint at least this far: epoch 1, mid-epoch
ALL_JOBS_TIMEOUT_S = 420


def overrides(shards: dict[str, Path], out: Path, name: str) -> list[str]:
    return [
        f"data.train={shards['train']}",
        f"data.val={shards['val']}",
        f"run.output_dir={out}",
        f"run.name={name}",
        "data.batch_size=8",
        "train.log_every=1",
        "train.checkpoint_every=4",
        f"train.epochs={EPOCHS}",
        "train.eval_every=100",
    ]  # evaluated once, at the end: this is about resuming


def sbatch_stage1(env: dict[str, str], shards: dict[str, Path], out: Path, name: str, mode: str, *extra: str) -> int:
    result = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--nodes=2",
            "--gpus-per-node=0",
            "--cpus-per-task=1",
            f"--output={out}/{name}.out",
            f"--chdir={REPO}",
            "slurm/stage1.sh",
            *overrides(shards, out, name),
            *extra,
        ],
        env=env | {"EMI_CONFIG": TINY, "EMI_LAUNCH_MODE": mode},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip().split(";")[0])


def submitit_stage1(env: dict[str, str], shards: dict[str, Path], out: Path, name: str) -> int:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "emi.launch",
            "stage1",
            "--config",
            TINY,
            "--nodes",
            "2",
            "--gpus-per-node",
            "0",
            "--cpus-per-node",
            "1",
            "--time",
            "60",
            "--log-dir",
            str(out / "submitit-logs"),
            *overrides(shards, out, name),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return int(re.search(r"submitted stage1 to Slurm as job (\d+)", result.stdout).group(1))


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in run_dir.glob("checkpoints/step-*/trainer_state.json"))


def job_logs(out: Path, name: str, job_id: int) -> str:
    logs = [out / f"{name}.out", out / "submitit-logs" / f"{job_id}_0_log.err", out / name / "log.txt"]
    return "\n".join(f"----- {log}\n{log.read_text()[-6000:]}" for log in logs if log.exists())


@pytest.fixture(scope="module")
def jobs(
    cluster: dict[str, str],
    synthetic_shards: dict[str, Path],  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[int, Path]]:
    """Five 2-node jobs on the 2 x 2 CPUs, two at a time; four are interrupted once they have a checkpoint from
    step FIRST_CHECKPOINT on. Returns name -> (job id, folder); every job has ended when it returns."""
    out = tmp_path_factory.mktemp("slurm-jobs")
    ids = {
        "requeued": sbatch_stage1(cluster, synthetic_shards, out, "requeued", "accelerate"),
        "usr1": sbatch_stage1(cluster, synthetic_shards, out, "usr1", "srun"),
        "reference": sbatch_stage1(cluster, synthetic_shards, out, "reference", "accelerate"),
        "submitit": submitit_stage1(cluster, synthetic_shards, out, "submitit"),
        "shrunk": sbatch_stage1(cluster, synthetic_shards, out, "shrunk", "accelerate", "train.record_samples=true"),
    }
    interruptions = {
        "requeued": ["scontrol", "requeue"],  # preemption: SIGTERM to every process, then the job is requeued
        "usr1": ["scancel", "--signal=USR1"],  # what --signal=USR1@120 sends before the time limit
        "submitit": ["scancel", "--signal=USR2"],  # submitit's own warning signal (its --signal=USR2@120)
        "shrunk": ["scontrol", "requeuehold"],  # requeued and held, then given one node (shrink_to_one_node)
    }
    deadline = time.monotonic() + ALL_JOBS_TIMEOUT_S
    try:
        while interruptions or any(job_field(cluster, i, "JobState") not in FINAL_STATES for i in ids.values()):
            for name in [n for n in interruptions if max(checkpoint_steps(out / n), default=0) >= FIRST_CHECKPOINT]:
                subprocess.run([*interruptions.pop(name), str(ids[name])], env=cluster, timeout=30, check=True)
                if name == "shrunk":
                    shrink_to_one_node(cluster, ids[name])
            if time.monotonic() > deadline:
                states = {name: job_field(cluster, i, "JobState") for name, i in ids.items()}
                pytest.fail(
                    f"jobs not done in {ALL_JOBS_TIMEOUT_S}s: {states}, not yet interrupted: "
                    f"{sorted(interruptions)}\n" + "\n".join(job_logs(out, n, i) for n, i in ids.items())
                )
            time.sleep(0.2)
    finally:
        subprocess.run(["scancel", *map(str, ids.values())], env=cluster, timeout=30)  # no-op once all ended
    return {name: (job_id, out) for name, job_id in ids.items()}


def shrink_to_one_node(env: dict[str, str], job_id: int) -> None:
    """Give a held, requeued job one node and one task, and let it run again (once it is pending: an update made
    while it is still completing does not last)."""
    deadline = time.monotonic() + 120
    while job_field(env, job_id, "JobState") != "PENDING":
        assert time.monotonic() < deadline, f"job {job_id} not pending 120 s after requeuehold"
        time.sleep(0.2)
    subprocess.run(
        ["scontrol", "update", f"JobId={job_id}", "NumNodes=1", "NumTasks=1"], env=env, timeout=30, check=True
    )
    subprocess.run(["scontrol", "release", str(job_id)], env=env, timeout=30, check=True)


def assert_completed(env: dict[str, str], job_id: int, out: Path, name: str, restarts: int) -> str:
    """The job ended well after `restarts` requeues and trained every step exactly once; returns the run log."""
    logs = job_logs(out, name, job_id)
    assert (job_field(env, job_id, "JobState"), job_field(env, job_id, "ExitCode")) == ("COMPLETED", "0:0"), logs
    assert job_field(env, job_id, "Restarts") == str(restarts), logs
    run_dir = out / name
    log = (run_dir / "log.txt").read_text()
    assert "DEEPSPEED world=2 rank=0" in log and f"done: {STEPS} steps" in log, log
    assert [step for step, _ in scalars(run_dir, "train/loss")] == list(range(1, STEPS + 1))  # no gap, no repeat
    assert (run_dir / "checkpoints" / f"step-{STEPS:08d}" / "trainer_state.json").exists()
    return log


def assert_same_weights(out: Path, name: str) -> None:
    reference, resumed = exported(out / "reference"), exported(out / name)
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[key], resumed[key]) for key in reference)


@pytest.mark.slurm
def test_sbatch_stage1_trains_on_two_nodes_and_exports(jobs: dict, cluster: dict[str, str]) -> None:  # noqa: F811
    job_id, out = jobs["reference"]
    log = assert_completed(cluster, job_id, out, "reference", restarts=0)
    assert "no checkpoint to resume from; starting fresh" in log
    printed = (out / "reference.out").read_text()
    assert (
        f"job {job_id} (restart 0) on n[1-2]: mode accelerate, 2 node(s) x 1 process(es), 1 task(s) per node: "
        f"-m emi.stages.stage1 --config {TINY} --resume latest"
    ) in printed
    for encoder in ("vision", "text", "audio"):
        assert (out / "reference" / "export" / encoder / "model.safetensors").stat().st_size > 0


@pytest.mark.slurm
def test_scontrol_requeue_resumes_and_ends_with_the_uninterrupted_weights(jobs: dict, cluster: dict[str, str]) -> None:  # noqa: F811
    job_id, out = jobs["requeued"]
    log = assert_completed(cluster, job_id, out, "requeued", restarts=1)
    # Resumed from the SIGTERM checkpoint, or from the last periodic one when Slurm killed the job before it.
    assert re.search(rf"resumed from {out}/requeued/checkpoints/step-\d{{8}}", log), log
    assert f"job {job_id} (restart 1)" in (out / "requeued.out").read_text()
    assert_same_weights(out, "requeued")


@pytest.mark.slurm
def test_sigusr1_checkpoints_requeues_itself_and_ends_with_the_uninterrupted_weights(
    jobs: dict, cluster: dict[str, str]
) -> None:  # noqa: F811
    job_id, out = jobs["usr1"]  # srun mode: every task is a training process
    log = assert_completed(cluster, job_id, out, "usr1", restarts=1)
    stopped = re.search(r"stopped by signal 10 at step (\d+); checkpoint saved", log)
    assert stopped and FIRST_CHECKPOINT <= int(stopped.group(1)) < STEPS, log
    assert f"resumed from {out}/usr1/checkpoints/step-{int(stopped.group(1)):08d}" in log
    assert "mode srun, 2 node(s) x 1 process(es), 1 task(s) per node" in (out / "usr1.out").read_text()
    assert_same_weights(out, "usr1")


@pytest.mark.slurm
def test_submitit_job_trains_on_two_nodes_and_requeues_itself_when_preempted(
    jobs: dict, cluster: dict[str, str]
) -> None:  # noqa: F811
    job_id, out = jobs["submitit"]
    log = assert_completed(cluster, job_id, out, "submitit", restarts=1)
    # submitit's checkpoint() forwarded SIGUSR1 (10) to the trainers, which saved and stopped; submitit requeued.
    stopped = re.search(r"stopped by signal 10 at step (\d+); checkpoint saved", log)
    assert stopped and FIRST_CHECKPOINT <= int(stopped.group(1)) < STEPS, log
    assert f"resumed from {out}/submitit/checkpoints/step-{int(stopped.group(1)):08d}" in log
    assert "requeued Slurm job" not in log  # submitit requeues, not the trainer
    assert_same_weights(out, "submitit")


@pytest.mark.slurm
def test_a_job_requeued_onto_one_node_finishes_with_every_sample_once_per_epoch(
    jobs: dict, cluster: dict[str, str]
) -> None:  # noqa: F811
    """2 nodes x 1 process until a mid-epoch checkpoint; requeued and resized to 1 node, the job resumes on one
    process with the global batch kept (grad_accum 1 -> 2), so the same steps follow."""
    job_id, out = jobs["shrunk"]
    log = assert_completed(cluster, job_id, out, "shrunk", restarts=1)
    assert (
        "resumed from 2 to 1 processes: global batch 16 kept (train.resize=accum); batch 8 -> 8, grad_accum 1 -> 2"
        in log
    )
    assert "on n1: mode accelerate, 1 node(s) x 1 process(es)" in (out / "shrunk.out").read_text()
    records = read_run_records(out / "shrunk")
    keys = {key for record in records for key in record.keys}
    assert len(keys) == 48 and {record.processes for record in records} == {1, 2}
    for epoch in range(EPOCHS):
        seen = Counter(key for record in records if record.epoch == epoch for key in record.keys)
        assert seen == Counter(keys), f"epoch {epoch}: {sorted(k for k, n in seen.items() if n != 1)}"


def run_batch_script(env: dict[str, str], out: Path, script: Path, options: list[str], args: list[str]) -> str:
    """sbatch SCRIPT, wait until it ends; returns its final state and exit code and its output."""
    result = subprocess.run(
        ["sbatch", "--parsable", f"--output={out}/job.out", *options, str(script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    job_id = int(result.stdout.strip().split(";")[0])
    deadline = time.monotonic() + 120
    while (state := job_field(env, job_id, "JobState")) not in FINAL_STATES:
        if time.monotonic() > deadline:
            subprocess.run(["scancel", str(job_id)], env=env, timeout=30)
            pytest.fail(f"job {job_id} still {state} after 120s")
        time.sleep(0.2)
    return f"{state} {job_field(env, job_id, 'ExitCode')}\n{(out / 'job.out').read_text()}"


@pytest.mark.slurm
def test_srun_mode_starts_one_task_per_process(cluster: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    """slurm/common.sh on one node with 2 CPUs: two tasks, one CPU each, ranks 0 and 1 (slurm_probe records)."""
    script = tmp_path / "probe.sh"
    script.write_text(f"#!/bin/bash\nsource slurm/common.sh\nrun_on_every_node tests/slurm_probe.py {tmp_path}\n")
    ended = run_batch_script(
        cluster | {"EMI_LAUNCH_MODE": "srun", "EMI_PROCS_PER_NODE": "2"},
        tmp_path,
        script,
        ["--nodes=1", "--cpus-per-task=2", f"--chdir={REPO}"],
        [],
    )
    assert ended.startswith("COMPLETED 0:0\n"), ended
    assert "mode srun, 1 node(s) x 2 process(es), 2 task(s) per node: tests/slurm_probe.py" in ended
    records = sorted((json.loads(p.read_text()) for p in tmp_path.glob("rank-*.json")), key=lambda r: r["rank"])
    assert [(r["rank"], r["node"], r["local_rank"], r["world_size"], r["sum"]) for r in records] == [
        (0, 0, 0, 2, 1),
        (1, 0, 1, 2, 1),
    ]


@pytest.mark.slurm
@pytest.mark.parametrize(
    ("env_extra", "options", "message"),
    [
        (
            {"EMI_LAUNCH_MODE": "srun", "EMI_PROCS_PER_NODE": "2"},
            ["--cpus-per-task=1", f"--chdir={REPO}"],
            "slurm: 2 tasks per node need at least as many CPUs, the job has 1 per node (--cpus-per-task)",
        ),
        (
            {"EMI_LAUNCH_MODE": "mpi"},
            ["--cpus-per-task=1", f"--chdir={REPO}"],
            "slurm: EMI_LAUNCH_MODE='mpi' is not one of: accelerate, srun",
        ),
        (
            {"EMI_CONFIG": "configs/stage1/none.yaml"},
            ["--cpus-per-task=1", f"--chdir={REPO}"],
            "emi: error: config file not found: configs/stage1/none.yaml (looked for configs/stage1/none.yaml, ",
        ),
        (
            {},
            ["--cpus-per-task=1", "--chdir=/tmp"],
            "slurm/stage1.sh: run sbatch from the repository root (or --chdir=REPO)",
        ),
    ],
)
def test_stage1_script_refuses_bad_settings_before_starting(
    cluster: dict[str, str],
    tmp_path: Path,  # noqa: F811
    env_extra: dict,
    options: list[str],
    message: str,
) -> None:
    env = cluster | {"EMI_CONFIG": TINY} | env_extra
    ended = run_batch_script(
        env, tmp_path, REPO / "slurm" / "stage1.sh", ["--nodes=1", "--gpus-per-node=0", *options], []
    )
    assert ended.startswith("FAILED 2:0\n"), ended
    assert message in ended
