"""How emi runs on a cluster's nodes, in one place for the submitit launcher (emi.launch), sweeps (emi.sweep) and the
sbatch scripts (slurm/launch.sh runs `python -m emi.cluster node ...` on every node).

    ENTRY_POINTS        the modules a job runs (the installed package's: no checkout needed on the nodes)
    rendezvous_port     the port rank 0 listens on: distinct for concurrent jobs and for each restart of one job
    accelerate_command  the `accelerate launch` one node runs, its machine rank and the rendezvous in it
    NodeJob             a submitit job: every node runs its `accelerate launch` and stops it at a checkpoint
    ShardTask           a submitit job: one task of a job-array shard build
    submitit_executor   the executor for NodeJobs: Slurm (requeueable, warned before its time limit) or this machine

`python -m emi.cluster node [--] ENTRY [ARGS...]` (ENTRY a script, or `-m MODULE`) is one task of a Slurm job step:
it reads the step from Slurm's environment and, with EMI_LAUNCH_MODE=accelerate (default, one task per node), runs
the node's `accelerate launch`; with EMI_LAUNCH_MODE=srun (one task per process) it runs the entry point itself with
RANK, LOCAL_RANK and WORLD_SIZE from the task. Either way the process replaces itself with what it runs, so Slurm's
signals reach it directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path

import psutil
import submitit
from submitit.helpers import DelayedSubmission

from emi.errors import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE

ENTRY_POINTS = {
    "stage1": ["-m", "emi.stages.stage1"],
    "stage2": ["-m", "emi.stages.stage2"],
    "features": ["-m", "emi.cli", "features", "extract"],
}
SIGNAL_DELAY_S = 120  # the trainer needs one step and one checkpoint; Slurm kills the job at its time limit
MAX_TIMEOUT_REQUEUES = 20  # a long run is meant to continue over many time-limited jobs (submitit's default: 3)
POLL_S = 1.0
RESEND_STOP_S = 5.0
LOG_TAIL_LINES = 40
LAUNCH_MODES = ("accelerate", "srun")


def rendezvous_port(job_id: int, restart_count: int) -> int:
    """Distinct for concurrent jobs and for each restart of one job (a requeued job keeps its id), and below Linux's
    ephemeral range (32768+), where outgoing connections could already hold the port."""
    return 20000 + (job_id * 10 + restart_count % 10) % 12000


def accelerate_command(
    entry: list[str],
    num_nodes: int,
    node_rank: int,
    procs_per_node: int,
    master_addr: str,
    port: int,
    config_file: str | None = None,
) -> list[str]:
    """The `accelerate launch` of one node: rendezvous at rank 0's node; a config file chooses the distributed
    type, else several processes run under torchrun (--multi_gpu: on the CPU the trainer picks gloo)."""
    num_processes = num_nodes * procs_per_node
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        str(num_nodes),
        "--machine_rank",
        str(node_rank),
        "--num_processes",
        str(num_processes),
        "--main_process_ip",
        master_addr,
        "--main_process_port",
        str(port),
        "--rdzv_backend",
        "static",
        # the job already started one launcher per node: DeepSpeed must not ssh/pdsh to the others
        "--deepspeed_multinode_launcher",
        "standard",
    ]
    if config_file:
        command += ["--config_file", config_file]
    elif num_processes > 1:
        command.append("--multi_gpu")
    return command + entry


def node_address(host: str) -> str:
    """Where a node listens: its name, or its NodeAddr from Slurm where the name does not resolve (the local test
    cluster's n1, n2)."""
    try:
        socket.gethostbyname(host)
        return host
    except socket.gaierror:
        shown = subprocess.run(["scontrol", "show", "node", "-o", host], capture_output=True, text=True).stdout
        addresses = [field.split("=", 1)[1] for field in shown.split() if field.startswith("NodeAddr=")]
        if not addresses:
            raise RuntimeError(f"node {host} does not resolve and scontrol shows no NodeAddr for it") from None
        return addresses[0]


def child_environment(on_gpus: bool, base: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment the training processes start in: one BLAS thread each, DeepSpeed's CPU accelerator where
    there is no GPU (the trainer picks gloo)."""
    env = dict(base)
    env.setdefault("OMP_NUM_THREADS", "1")
    if not on_gpus:
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def visible_gpus() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset") == "" or shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def _ignore_stop_signals() -> None:
    # In the child before exec: Slurm sends submitit's SIGUSR2 to every process of the step, and the launcher
    # (torchrun) dies of SIGUSR1. The trainer installs its own SIGUSR1 handler over the inherited "ignore".
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def signal_trainers(launcher: subprocess.Popen, signum: int) -> None:
    """Signal the training processes: the children of `accelerate launch` (torchrun's workers, or the single
    process it starts), not their own children (data loader workers)."""
    try:
        trainers = psutil.Process(launcher.pid).children()
    except psutil.NoSuchProcess:
        return
    for trainer in trainers:
        with contextlib.suppress(psutil.NoSuchProcess):
            trainer.send_signal(signum)


def log_tail(path: Path) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=LOG_TAIL_LINES))
    except OSError as err:
        return f"(cannot read it: {err})"


@dataclasses.dataclass
class NodeJob(submitit.helpers.Checkpointable):
    """What every node of the job runs: `program` (the entry point and its arguments) under `accelerate launch`.

    Submitit calls `checkpoint()` on task 0 when the job is preempted or near its time limit (Slurm sends its
    warning, SIGUSR2, to the whole step): it forwards SIGUSR1 to the training processes, waits until they have saved
    a checkpoint and exited, and hands submitit the same job to requeue. SIGTERM (scontrol requeue, preemption,
    scancel) reaches the trainers directly."""

    program: list[str]
    gpus_per_node: int
    workdir: str

    def __call__(self) -> None:
        env = submitit.JobEnvironment()
        restart_count = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        command = accelerate_command(
            self.program,
            env.num_nodes,
            env.node,
            max(1, self.gpus_per_node),
            master_address(env),
            rendezvous_port(int(env.raw_job_id), restart_count),
        )
        print(f"node {env.node} of {env.num_nodes} runs: {shlex.join(command)}", flush=True)
        self._child = subprocess.Popen(
            command, cwd=self.workdir, env=child_environment(self.gpus_per_node > 0), preexec_fn=_ignore_stop_signals
        )
        try:
            # poll, not wait(): checkpoint() runs in submitit's signal handler meanwhile and waits for the child
            # itself, which a blocked wait() here would prevent (it holds the Popen's wait lock)
            while (returncode := self._child.poll()) is None:
                time.sleep(POLL_S)
        finally:
            if self._child.poll() is None:  # interrupted (cancelled local job): let the trainers checkpoint
                signal_trainers(self._child, signal.SIGTERM)
        if returncode != 0:
            raise RuntimeError(
                f"node {env.node}: `{shlex.join(command)}` exited with {returncode}; "
                f"last lines of {env.paths.stderr}:\n{log_tail(env.paths.stderr)}"
            )

    def checkpoint(self) -> DelayedSubmission:
        """Stop the trainers at a checkpoint (all ranks agree on the stop, so the other nodes stop too), then have
        submitit requeue."""
        child = getattr(self, "_child", None)
        while child is not None and child.poll() is None:
            # resent: a trainer that is still starting up ignores SIGUSR1 until it installs its handler
            signal_trainers(child, signal.SIGUSR1)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=RESEND_STOP_S)
        return DelayedSubmission(dataclasses.replace(self))  # a fresh job: the child process does not pickle


def master_address(env: submitit.JobEnvironment) -> str:
    """Where rank 0 listens: the job's first node (this machine for a one-node job)."""
    return "127.0.0.1" if env.num_nodes == 1 else node_address(env.hostnames[0])


@dataclasses.dataclass
class ShardTask(submitit.helpers.Checkpointable):
    """Task `index` of a job-array shard build: `emi shards build ARGS --num-tasks count --task-index index`."""

    build_args: list[str]
    index: int
    count: int
    workdir: str

    def __call__(self) -> int:
        command = [
            sys.executable,
            "-m",
            "emi.cli",
            "shards",
            "build",
            *self.build_args,
            "--num-tasks",
            str(self.count),
            "--task-index",
            str(self.index),
        ]
        print(f"task {self.index} of {self.count} runs: {shlex.join(command)}", flush=True)
        returncode = subprocess.run(command, cwd=self.workdir, env=child_environment(False)).returncode
        if returncode not in (EXIT_OK, EXIT_PARTIAL):  # 3: some clips failed, which a re-run cannot change
            raise RuntimeError(f"task {self.index}: `{shlex.join(command)}` exited with {returncode}")
        return returncode


def submitit_executor(
    log_dir: Path,
    local: bool,
    name: str,
    nodes: int,
    gpus_per_node: int,
    cpus_per_node: int,
    minutes: int,
    partition: str | None,
    **parameters: object,
) -> submitit.AutoExecutor:
    """The executor for NodeJobs: Slurm (requeueable, warned SIGNAL_DELAY_S before the time limit) or, with
    `local`, this machine. `parameters`: more submitit parameters (slurm_array_parallelism)."""
    executor = submitit.AutoExecutor(
        folder=log_dir, cluster="local" if local else "slurm", slurm_max_num_timeout=MAX_TIMEOUT_REQUEUES
    )
    executor.update_parameters(
        name=name,
        nodes=nodes,
        tasks_per_node=1,
        gpus_per_node=gpus_per_node,
        cpus_per_task=cpus_per_node,
        timeout_min=minutes,
        slurm_partition=partition,
        slurm_signal_delay_s=SIGNAL_DELAY_S,
        slurm_additional_parameters={"requeue": True},
        # srun does not pass the allocation's CPUs per task on to the step (Slurm 22.05+); kill-on-bad-exit:
        # a node that fails must not leave the others waiting in a collective.
        slurm_srun_args=[f"--cpus-per-task={cpus_per_node}", "--kill-on-bad-exit=1"],
        **parameters,
    )
    return executor


# ------------------------------------------------------------------------------------- one task of a Slurm step


class StepError(Exception):
    """The step is not one this launcher can run: exit 2 with the reason."""


def step_command(entry: list[str], mode: str, env: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """(what this task runs, its environment) for a task of a Slurm job step (SLURM_* in `env`)."""
    for name in (
        "SLURM_JOB_ID",
        "SLURM_STEP_NODELIST",
        "SLURM_STEP_NUM_NODES",
        "SLURM_STEP_NUM_TASKS",
        "SLURM_NODEID",
        "SLURM_PROCID",
        "SLURM_LOCALID",
    ):
        if not env.get(name):
            raise StepError(f"{name} is not set: run this through srun inside a Slurm job, not from the batch shell")
    hosts = subprocess.run(
        ["scontrol", "show", "hostnames", env["SLURM_STEP_NODELIST"]], capture_output=True, text=True
    ).stdout.split()
    if not hosts:
        raise StepError(f"cannot expand SLURM_STEP_NODELIST='{env['SLURM_STEP_NODELIST']}' with scontrol")
    port = int(
        env.get("EMI_MASTER_PORT")
        or rendezvous_port(int(env["SLURM_JOB_ID"]), int(env.get("SLURM_RESTART_COUNT") or 0))
    )
    master, nodes, tasks = node_address(hosts[0]), int(env["SLURM_STEP_NUM_NODES"]), int(env["SLURM_STEP_NUM_TASKS"])
    child = child_environment(visible_gpus(), env)
    if mode == "srun":
        child = {
            **child,
            "RANK": env["SLURM_PROCID"],
            "LOCAL_RANK": env["SLURM_LOCALID"],
            "WORLD_SIZE": str(tasks),
            "MASTER_ADDR": master,
            "MASTER_PORT": str(port),
        }
        return [sys.executable, *entry], child
    if tasks != nodes:
        raise StepError(
            f"accelerate mode starts one launcher per node: use srun --ntasks-per-node=1 (this step has "
            f"{tasks} tasks on {nodes} nodes), or EMI_LAUNCH_MODE=srun"
        )
    procs = env.get("EMI_PROCS_PER_NODE") or env.get("SLURM_GPUS_ON_NODE") or "1"
    if not procs.isdigit() or int(procs) < 1:
        raise StepError(f"EMI_PROCS_PER_NODE='{procs}' is not a positive integer")
    config_file = env.get("EMI_ACCELERATE_CONFIG")
    if config_file and not Path(config_file).is_file():
        raise StepError(f"EMI_ACCELERATE_CONFIG={config_file}: no such file")
    return accelerate_command(entry, nodes, int(env["SLURM_NODEID"]), int(procs), master, port, config_file), child


def run_node(argv: list[str]) -> int:
    """`python -m emi.cluster node [--] ENTRY [ARGS...]`: replaces this process with the task's launcher or entry."""
    usage = "usage: srun bash slurm/launch.sh ENTRY.py [ARGS...], or -m MODULE [ARGS...]"
    argv = argv[1:] if argv[:1] == ["--"] else argv
    try:
        if not argv or argv[:1] == ["-m"] and len(argv) < 2:
            raise StepError(usage)
        entry, args = (argv[:2], argv[2:]) if argv[0] == "-m" else (argv[:1], argv[1:])
        if entry[0] != "-m" and not Path(entry[0]).is_file():
            raise StepError(f"entry point '{entry[0]}': no such file (paths are relative to {os.getcwd()})")
        mode = os.environ.get("EMI_LAUNCH_MODE", "accelerate")
        if mode not in LAUNCH_MODES:
            raise StepError(f"EMI_LAUNCH_MODE='{mode}' is not one of: {', '.join(LAUNCH_MODES)}")
        command, env = step_command(entry + args, mode, os.environ)
    except StepError as err:
        print(f"slurm/launch.sh: {err}", file=sys.stderr)
        return EXIT_USAGE
    if mode == "accelerate":
        _ignore_stop_signals()  # torchrun dies of SIGUSR1; the trainers install their own handler
    os.execve(command[0], command, env)


if __name__ == "__main__":
    if sys.argv[1:2] != ["node"]:
        sys.exit("usage: python -m emi.cluster node [--] ENTRY [ARGS...]")
    sys.exit(run_node(sys.argv[2:]))
