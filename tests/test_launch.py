"""emi.launch without a cluster: argument checks, the command each node runs for a given submitit JobEnvironment,
and tiny Stage I runs through submitit's LocalExecutor, one of them preempted (SIGUSR2 to the submitit task, as
Slurm sends it) and requeued by submitit, ending with the uninterrupted run's weights."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from submitit.local.local import LocalJobEnvironment
from submitit.slurm.slurm import SlurmJobEnvironment

from emi.cluster import accelerate_command, master_address, rendezvous_port
from emi.launch import main, parse_args, program

from helpers import GRID, KEYS, REPO, cpu_env, exported, grid_labels, scalars, wait_until, write_labels

TINY = str(REPO / "configs" / "stage1" / "tiny.yaml")
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
EPOCHS = 4
STEPS = EPOCHS * 48 // 8  # one process: 48 clips / batch 8 = 6 steps per epoch
RUN_TIMEOUT_S = 600


def slurm_environment(monkeypatch: pytest.MonkeyPatch, **values: str) -> SlurmJobEnvironment:
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return SlurmJobEnvironment()


def test_node_command_of_the_second_node_of_a_two_node_gpu_job(monkeypatch: pytest.MonkeyPatch) -> None:
    env = slurm_environment(
        monkeypatch,
        SLURM_JOB_ID="1234",
        SLURM_JOB_NUM_NODES="2",
        SLURM_NODEID="1",
        SLURM_JOB_NODELIST="gpu[07-08]",
        SLURM_NTASKS="2",
        SLURM_PROCID="1",
    )
    args = parse_args(["stage1", "--config", TINY, "--nodes", "2", "--gpus-per-node", "8", "train.epochs=3"])
    port = rendezvous_port(int(env.raw_job_id), restart_count=1)
    assert port == 20000 + (1234 * 10 + 1) % 12000  # distinct for each restart of the job
    command = accelerate_command(program(args), env.num_nodes, env.node, args.gpus_per_node, "gpu07", port)
    assert command == [
        *ACCELERATE,
        "--num_machines",
        "2",
        "--machine_rank",
        "1",
        "--num_processes",
        "16",
        "--main_process_ip",
        "gpu07",
        "--main_process_port",
        str(port),
        "--rdzv_backend",
        "static",
        "--deepspeed_multinode_launcher",
        "standard",
        "--multi_gpu",
        "-m",
        "emi.stages.stage1",
        "--config",
        TINY,
        "--resume",
        "latest",
        "train.epochs=3",
    ]
    assert env.hostnames == ["gpu07", "gpu08"]


def test_node_command_of_a_single_cpu_node_runs_one_process_without_multi_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "SUBMITIT_LOCAL_JOB_ID": "77",
        "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
        "SUBMITIT_LOCAL_NODEID": "0",
    }.items():
        monkeypatch.setenv(name, value)
    env = LocalJobEnvironment()
    args = parse_args(["features", "--gpus-per-node", "0", "--", "--encoders", "enc", "--shards", "sh", "--out", "out"])
    assert master_address(env) == "127.0.0.1"
    command = accelerate_command(
        program(args),
        env.num_nodes,
        env.node,
        max(1, args.gpus_per_node),
        master_address(env),
        rendezvous_port(int(env.raw_job_id), 0),
    )
    assert command == [
        *ACCELERATE,
        "--num_machines",
        "1",
        "--machine_rank",
        "0",
        "--num_processes",
        "1",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(20000 + 770),
        "--rdzv_backend",
        "static",
        "--deepspeed_multinode_launcher",
        "standard",
        "-m",
        "emi.cli",
        "features",
        "extract",
        "--encoders",
        "enc",
        "--shards",
        "sh",
        "--out",
        "out",
    ]


def test_master_address_is_the_first_node_when_it_resolves(monkeypatch: pytest.MonkeyPatch) -> None:
    env = slurm_environment(
        monkeypatch, SLURM_JOB_ID="5", SLURM_JOB_NUM_NODES="2", SLURM_NODEID="0", SLURM_JOB_NODELIST="localhost,other"
    )
    assert master_address(env) == "localhost"


def test_overrides_and_options_may_be_mixed() -> None:
    args = parse_args(
        [
            "stage2",
            "train.epochs=2",
            "--config",
            TINY,
            "--gpus-per-node",
            "4",
            "--nodes",
            "3",
            "data.batch_size=8",
            "--partition",
            "gpu",
            "--time",
            "90",
            "--local",
            "--nodes",
            "1",
        ]
    )
    assert (args.stage, args.nodes, args.gpus_per_node, args.partition, args.time, args.local) == (
        "stage2",
        1,
        4,
        "gpu",
        90,
        True,
    )
    assert program(args) == [
        "-m",
        "emi.stages.stage2",
        "--config",
        TINY,
        "--resume",
        "latest",
        "train.epochs=2",
        "data.batch_size=8",
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["stage1", "--gpus-per-node", "1"], "stage1 needs --config"),
        (
            ["stage1", "--config", "no/such.yaml", "--gpus-per-node", "1"],
            "--config: config file not found: no/such.yaml",
        ),
        (["features", "--config", TINY, "--gpus-per-node", "0"], "features takes no --config"),
        (["stage1", "--config", TINY], "stage1 needs --gpus-per-node"),
        (["stage1", "--config", TINY, "--gpus-per-node", "0", "--nodes", "0"], "need nodes >= 1"),
        (
            ["stage1", "--config", TINY, "--gpus-per-node", "0", "--local", "--nodes", "2"],
            "--local runs on this machine only: --nodes 2 needs a Slurm cluster",
        ),
        (["stage3", "--config", TINY, "--gpus-per-node", "0"], "invalid choice: 'stage3'"),
        (["shards", "--", "--out", "x"], "shards needs --tasks >= 1"),
        (["shards", "--tasks", "2", "--gpus-per-node", "1"], "shards takes --tasks, not --config, --gpus-per-node"),
    ],
)
def test_bad_arguments_exit_2_with_the_reason(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_bad_override_is_refused_before_anything_is_submitted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["stage1", "--config", TINY, "--gpus-per-node", "0", "--local", "--log-dir", str(tmp_path), "train.nope=1"]
    )
    assert code == 2
    assert f"error: {TINY}: unknown key 'train.nope' in train" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def submit_local(shards: dict[str, Path], out: Path, name: str, *extra: str) -> tuple[int, Path]:
    """`python -m emi.launch stage1 --local` as a user runs it; returns the job id (the local controller's pid)
    and submitit's folder."""
    log_dir = out / f"submitit-{name}"
    printed = out / f"{name}.txt"
    # To a file, not a pipe: the local job's controller inherits it and keeps a pipe open until the job ends.
    with open(printed, "w") as f:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "emi.launch",
                "stage1",
                "--config",
                TINY,
                "--gpus-per-node",
                "0",
                "--local",
                "--log-dir",
                str(log_dir),
                f"data.train={shards['train']}",
                f"data.val={shards['val']}",
                f"run.output_dir={out}",
                f"run.name={name}",
                "data.batch_size=8",
                "train.log_every=1",
                "train.checkpoint_every=4",
                f"train.epochs={EPOCHS}",
                "train.eval_every=100",
                *extra,
            ],
            cwd=REPO,
            env=cpu_env(),
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=60,
        )
    output = printed.read_text()
    assert result.returncode == 0, output
    job_id = int(re.search(r"submitted stage1 locally as job (\d+)", output).group(1))
    assert f"tail -f {log_dir}/{job_id}_0_log.out" in output
    assert f"run folder: {out / name}" in output
    return job_id, log_dir


def wait_for(condition, what: str, log: Path) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {RUN_TIMEOUT_S}s; {log}:\n{log.read_text() if log.exists() else ''}")
        time.sleep(0.1)


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in run_dir.glob("checkpoints/step-*/trainer_state.json"))


@pytest.fixture(scope="module")
def local_runs(
    synthetic_shards: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, tuple[int, Path]]]:
    """Three local jobs at once: "plain" runs to the end; "preempted" gets SIGUSR2 after its first checkpoint
    from step 4 on (mid-epoch), as submitit's Slurm signal would, and must requeue itself and finish; "broken"
    points at shards that do not exist. Returns the folder and name -> (job id, submitit folder)."""
    out = tmp_path_factory.mktemp("launch")
    jobs = {name: submit_local(synthetic_shards, out, name) for name in ("plain", "preempted")}
    jobs["broken"] = submit_local(synthetic_shards, out, "broken", f"data.train={out}/no-shards")

    job_id, log_dir = jobs["preempted"]
    wait_for(
        lambda: any(step >= 4 for step in checkpoint_steps(out / "preempted")),
        "a checkpoint from step 4",
        log_dir / f"{job_id}_0_log.err",
    )
    # The controller runs one submitit task (python -m submitit.core._submit), which runs accelerate launch.
    [task] = psutil.Process(job_id).children()
    assert "submitit.core._submit" in " ".join(task.cmdline())
    task.send_signal(signal.SIGUSR2)

    for job_id, log_dir in jobs.values():
        # The result file appears when the job ends (never unpickled here: its absence is what we wait on).
        wait_for((log_dir / f"{job_id}_0_result.pkl").exists, f"job {job_id} ending", log_dir / f"{job_id}_0_log.err")
    return out, jobs


def test_local_job_trains_checkpoints_and_exports(local_runs: tuple) -> None:
    run_dir = local_runs[0] / "plain"
    assert f"done: {STEPS} steps" in (run_dir / "log.txt").read_text()
    assert (run_dir / "checkpoints" / f"step-{STEPS:08d}" / "trainer_state.json").exists()
    for encoder in ("vision", "text", "audio"):
        assert (run_dir / "export" / encoder / "model.safetensors").stat().st_size > 0
    assert [step for step, _ in scalars(run_dir, "train/loss")] == list(range(1, STEPS + 1))


def test_preempted_local_job_requeues_itself_and_ends_with_the_uninterrupted_weights(local_runs: tuple) -> None:
    run_dir = local_runs[0] / "preempted"
    log = (run_dir / "log.txt").read_text()
    # checkpoint() forwarded SIGUSR1 (10), the trainer saved and stopped, submitit restarted the job.
    stopped = re.search(r"stopped by signal 10 at step (\d+); checkpoint saved", log)
    assert stopped and 4 <= int(stopped.group(1)) < STEPS, log
    assert f"resumed from {run_dir}/checkpoints/step-{int(stopped.group(1)):08d}" in log
    assert f"done: {STEPS} steps" in log
    assert [step for step, _ in scalars(run_dir, "train/loss")] == list(range(1, STEPS + 1))
    reference, resumed = exported(local_runs[0] / "plain"), exported(run_dir)
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[name], resumed[name]) for name in reference)


def test_a_failing_trainer_fails_the_job_with_the_tail_of_its_log(local_runs: tuple) -> None:
    out, jobs = local_runs
    job_id, log_dir = jobs["broken"]
    stderr = (log_dir / f"{job_id}_0_log.err").read_text()
    error = re.search(r"RuntimeError: node 0: `(.+)` exited with (\d+); last lines of (\S+):\n", stderr)
    assert error, stderr
    assert "--resume latest" in error.group(1)
    # the trainer exits 2 (usage error); accelerate launch reports any failed process as 1
    assert (error.group(2), error.group(3)) == ("1", str(log_dir / f"{job_id}_0_log.err"))
    tail = stderr[error.end() :]
    assert f"error: shard {out}/no-shards: no such file or folder" in tail
    assert not (out / "broken" / "export").exists()


def command_line(process: psutil.Process) -> list[str]:
    """A process's arguments; none for one that has ended meanwhile (gone or a zombie: task 0 may end first)."""
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def test_local_shard_array_submits_a_killed_task_again_and_merges_into_the_single_build(tmp_path: Path) -> None:
    """`python -m emi.launch shards --tasks 2 --local`: task 1 is killed mid-build; the launcher submits it again,
    it keeps its complete shards, and the merged folder is byte for byte the single-process build."""
    from emi.shards.build import build_shards

    labels = write_labels(tmp_path / "labels.csv", grid_labels(KEYS), with_extension=True)
    args = ["--videos", str(GRID), "--labels", str(labels), "--shard-size", "1", "--frame-size", "64"]
    out = tmp_path / "array"
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "emi.launch",
            "shards",
            "--tasks",
            "2",
            "--local",
            "--cpus-per-node",
            "1",
            "--log-dir",
            str(tmp_path / "logs"),
            "--",
            *args,
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=cpu_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    partial = out / ".emi-tasks" / "task-00001-of-00002.json"

    def task_1_builder() -> psutil.Process | None:
        return next(
            (
                process
                for process in psutil.Process(launcher.pid).children(recursive=True)
                if "--task-index" in (cmdline := command_line(process))
                and cmdline[cmdline.index("--task-index") + 1] == "1"
            ),
            None,
        )

    # found before it has built anything (the slow part, listing processes, stays out of the window between its
    # first shard and its last), killed once it has built one
    builder = wait_until(task_1_builder, RUN_TIMEOUT_S, "task 1's builder", alive=launcher)
    wait_until(
        lambda: partial.exists() and json.loads(partial.read_text())["shards"],
        RUN_TIMEOUT_S,
        "task 1's first shard",
        alive=launcher,
    )
    builder.kill()
    printed, _ = launcher.communicate(timeout=RUN_TIMEOUT_S)
    assert launcher.returncode == 0, printed
    assert re.search(r"task 1 \(job \d+\) failed: .*exited with -9", printed), printed
    assert "tasks [1] did not complete: submitting them again" in printed
    assert "merged 2 task(s): 8 samples in 8 shard(s)" in printed
    task_log = "\n".join(path.read_text() for path in (tmp_path / "logs").glob("*_log.out"))
    assert re.search(r"task 1 of 2: 4 samples in 4 train shard\(s\) .*\((\d) written, [1-3] kept", task_log), task_log

    single = build_shards(videos=GRID, labels=labels, out=tmp_path / "single", shard_size=1, frame_size=64)
    assert single.num_failed == 0
    assert {path.name: path.read_bytes() for path in out.iterdir() if not path.name.startswith(".")} == {
        path.name: path.read_bytes() for path in (tmp_path / "single").iterdir() if not path.name.startswith(".")
    }
