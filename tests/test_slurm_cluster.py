"""The local Slurm cluster (slurm/local/up.sh, down.sh) and the per-node launcher (slurm/launch.sh), run for real:
multi-node jobs in both launch modes, signal delivery to the training processes, requeue, clean shutdown."""

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from emi.cluster import rendezvous_port

from slurm_cluster import DOWN, FINAL_STATES, UP, clean_env, cluster_env, job_field, require_slurm, run_script

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "slurm" / "launch.sh"
PROBE = "tests/slurm_probe.py"
DAEMONS = ("munged", "slurmctld", "slurmd-n1", "slurmd-n2")
JOB_TIMEOUT_S = 90


def is_running(pid: int) -> bool:
    """Alive and not a zombie waiting for its parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def submit(env: dict[str, str], out_dir: Path, options: list[str], command: str) -> int:
    result = subprocess.run(
        ["sbatch", "--parsable", f"--output={out_dir}/job.out", f"--chdir={REPO}", *options, "--wrap", command],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return int(result.stdout.strip().split(";")[0])


def wait_until(
    condition: Callable[[], bool], timeout_s: float, what: str, env: dict[str, str], job_id: int, out_dir: Path
) -> None:
    """Polls condition; on timeout cancels the job (no test hangs) and fails with the job's log."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", str(job_id)], env=env, timeout=30)
            log = out_dir / "job.out"
            pytest.fail(f"job {job_id}: {what} not reached in {timeout_s}s\n{log.read_text() if log.exists() else ''}")
        time.sleep(0.2)


def wait_for_job(env: dict[str, str], job_id: int, out_dir: Path) -> str:
    """Waits until the job ends; returns its final state."""
    wait_until(lambda: job_field(env, job_id, "JobState") in FINAL_STATES, JOB_TIMEOUT_S, "end", env, job_id, out_dir)
    return job_field(env, job_id, "JobState")


def expected_master_port(job_id: int, restart_count: int = 0) -> int:
    return rendezvous_port(job_id, restart_count)


def read_records(out_dir: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in out_dir.glob("rank-*.json")), key=lambda r: r["rank"])


@pytest.mark.slurm
@pytest.mark.parametrize(
    ("mode", "nodes", "procs_per_node"), [("accelerate", 2, 1), ("srun", 2, 1), ("accelerate", 1, 2), ("srun", 1, 2)]
)
def test_every_rank_runs_once_and_all_reduce_spans_the_job(
    cluster: dict[str, str], tmp_path: Path, mode: str, nodes: int, procs_per_node: int
) -> None:
    tasks_per_node = 1 if mode == "accelerate" else procs_per_node
    env = cluster | {"EMI_LAUNCH_MODE": mode, "EMI_PROCS_PER_NODE": str(procs_per_node)}
    job_id = submit(
        env,
        tmp_path,
        [f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}"],
        f"srun bash slurm/launch.sh {PROBE} {tmp_path}",
    )

    state = wait_for_job(env, job_id, tmp_path)
    assert (state, job_field(env, job_id, "ExitCode")) == ("COMPLETED", "0:0"), (tmp_path / "job.out").read_text()
    world = nodes * procs_per_node
    records = read_records(tmp_path)
    assert [r["rank"] for r in records] == list(range(world))
    # Ranks fill a node before the next one, in both modes: rank = node * procs_per_node + local_rank.
    assert [(r["node"], r["local_rank"]) for r in records] == [
        (node, local) for node in range(nodes) for local in range(procs_per_node)
    ]
    for record in records:
        assert record["world_size"] == world
        assert record["sum"] == sum(range(world))
        assert record["backend"] == "gloo"
        # n1 does not resolve here, so launch.sh took the node's NodeAddr from Slurm.
        assert (record["master_addr"], record["master_port"]) == ("127.0.0.1", expected_master_port(job_id))


@pytest.mark.slurm
def test_sigusr1_reaches_every_training_process_and_the_job_ends_cleanly(
    cluster: dict[str, str], tmp_path: Path
) -> None:
    # `scancel --signal` without --batch signals the job steps, as `#SBATCH --signal=USR1@120` does.
    env = cluster | {"EMI_LAUNCH_MODE": "accelerate"}
    job_id = submit(
        env,
        tmp_path,
        ["--nodes=2", "--ntasks-per-node=1"],
        f"srun bash slurm/launch.sh {PROBE} {tmp_path} --wait-for-signal",
    )
    ready = [tmp_path / "ready-0", tmp_path / "ready-1"]
    wait_until(lambda: all(p.exists() for p in ready), JOB_TIMEOUT_S, "both ranks ready", env, job_id, tmp_path)
    subprocess.run(["scancel", "--signal=USR1", str(job_id)], env=env, timeout=30, check=True)

    state = wait_for_job(env, job_id, tmp_path)
    # The launcher (torchrun) survived SIGUSR1, each rank got it exactly once, and they could still meet.
    assert (state, job_field(env, job_id, "ExitCode")) == ("COMPLETED", "0:0"), (tmp_path / "job.out").read_text()
    assert [(r["rank"], r["signals"]) for r in read_records(tmp_path)] == [(0, ["SIGUSR1"]), (1, ["SIGUSR1"])]


@pytest.mark.slurm
def test_requeued_job_runs_again_with_restart_count_and_a_new_port(cluster: dict[str, str], tmp_path: Path) -> None:
    runs = tmp_path / "runs.txt"
    command = (
        f'echo "run ${{SLURM_RESTART_COUNT:-0}}" >> {runs}; '
        "if [[ ${SLURM_RESTART_COUNT:-0} == 0 ]]; then exec sleep 300; fi; "  # requeued while asleep
        f"srun bash slurm/launch.sh {PROBE} {tmp_path}"
    )
    env = cluster | {"EMI_LAUNCH_MODE": "srun"}
    job_id = submit(env, tmp_path, ["--requeue", "--open-mode=append", "--nodes=1", "--ntasks=1"], command)
    wait_until(lambda: runs.exists() and "run 0" in runs.read_text(), JOB_TIMEOUT_S, "first run", env, job_id, tmp_path)
    subprocess.run(["scontrol", "requeue", str(job_id)], env=env, timeout=30, check=True)

    state = wait_for_job(env, job_id, tmp_path)
    assert (state, job_field(env, job_id, "Restarts")) == ("COMPLETED", "1"), (tmp_path / "job.out").read_text()
    assert runs.read_text().splitlines() == ["run 0", "run 1"]
    [record] = read_records(tmp_path)
    assert (record["world_size"], record["sum"]) == (1, 0)
    assert record["master_port"] == expected_master_port(job_id, restart_count=1) != expected_master_port(job_id)


@pytest.mark.slurm
def test_accelerate_mode_refuses_several_tasks_per_node(cluster: dict[str, str], tmp_path: Path) -> None:
    result = subprocess.run(
        ["srun", "--nodes=1", "--ntasks=2", "bash", str(LAUNCH), PROBE, str(tmp_path)],
        env=cluster | {"EMI_LAUNCH_MODE": "accelerate"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "one launcher per node: use srun --ntasks-per-node=1 (this step has 2 tasks on 1 nodes)" in result.stderr
    assert not list(tmp_path.glob("rank-*.json"))


@pytest.mark.slurm
def test_up_is_idempotent_and_down_leaves_no_daemons(slurm_root: Path) -> None:
    require_slurm()
    state_dir = slurm_root / "lifecycle"
    env = cluster_env(state_dir)
    try:
        first = run_script(UP, env)
        assert first.returncode == 0, first.stderr
        assert f"export SLURM_CONF={state_dir}/slurm.conf" in first.stdout
        pids = {d: int((state_dir / ("munge" if d == "munged" else "run") / f"{d}.pid").read_text()) for d in DAEMONS}
        assert all(is_running(pid) for pid in pids.values())

        again = run_script(UP, env)
        assert again.returncode == 0 and "already up" in again.stdout, again.stderr
        assert all(is_running(pid) for pid in pids.values())

        down = run_script(DOWN, env)
        assert down.returncode == 0, down.stderr
        assert not [pid for pid in pids.values() if is_running(pid)]
        # -f: every daemon's command line names the state folder.
        assert subprocess.run(["pgrep", "-af", str(state_dir)], capture_output=True, text=True).stdout == ""
        assert (state_dir / "slurm.conf").exists() and (state_dir / "munge" / "munge.key").exists()

        idle = run_script(DOWN, env)
        assert idle.returncode == 0 and "nothing to stop" in idle.stdout
    finally:
        run_script(DOWN, env)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "usage: srun bash slurm/launch.sh ENTRY.py"),
        (["tests/no_such_entry.py"], "entry point 'tests/no_such_entry.py': no such file"),
        ([PROBE, "/tmp"], "SLURM_JOB_ID is not set: run this through srun inside a Slurm job"),
    ],
)
def test_launch_rejects_bad_use_with_a_clear_message(args: list[str], message: str) -> None:
    result = subprocess.run(
        ["bash", str(LAUNCH), *args], env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert message in result.stderr
