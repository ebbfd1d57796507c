"""Submit a training stage or the feature extraction to Slurm with submitit; the job requeues itself when preempted
or near its time limit and resumes from its newest checkpoint.

    python -m emi.launch {stage1,stage2} --config FILE --nodes N --gpus-per-node G [--cpus-per-node C]
        [--partition P] [--time MIN] [--local] [--log-dir DIR] [section.key=value ...]
    python -m emi.launch features --nodes N --gpus-per-node G [...] -- --encoders DIR --shards URL --out DIR
    python -m emi.launch shards --tasks N [--cpus-per-node C] [--retries R] [...] -- --videos DIR --labels CSV --out OUT

One submitit task per node starts the node's `accelerate launch` (machine rank and rendezvous from
submitit.JobEnvironment) as a child process, always with `--resume latest` for the training stages, so every
(re)start continues where the last checkpoint left off. Slurm sends submitit's warning signal (SIGUSR2,
`slurm_signal_delay_s` before the time limit) to the whole job step; submitit then calls `checkpoint()` on task 0,
which forwards SIGUSR1 to the training processes, waits until they have saved a checkpoint and exited, and hands
submitit the same job to requeue. SIGTERM (scontrol requeue, preemption, scancel) reaches the trainers directly.

The job runs in the directory it was submitted from, like sbatch: relative paths in the config and the overrides
resolve there. `--local` runs the job on this machine with submitit's LocalExecutor (one node), for development.
Both modes print the job id and the log to follow, and return while the job runs (a local job's controller
inherits stdout: a pipe that reads it stays open until the job ends).

`shards` is different: it submits an array of N one-node jobs, task I running `emi shards build ... --num-tasks N
--task-index I` (emi.shards.build), waits for them, submits again the tasks whose partial manifest is not complete
(up to --retries times; a re-run task keeps its complete shards, and a preempted one is requeued by submitit), then
merges (emi.shards.merge) and exits with the merge's code: 0, or 3 when clips failed or tasks never completed.

`emi sweep` (emi/sweep.py) submits its Stage II cells as one job array of NodeJobs, through `submitit_executor`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import psutil
import submitit
from submitit.helpers import DelayedSubmission

from emi.config import Stage1Config, Stage2Config, load_config, resolve_config_path
from emi.errors import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, UsageError
from emi.models.options import check_model_options

STAGES = ("stage1", "stage2", "features", "shards")
ENTRY_POINTS = {  # modules of the installed package: no checkout needed on the nodes
    "stage1": ["-m", "emi.stages.stage1"],
    "stage2": ["-m", "emi.stages.stage2"],
    "features": ["-m", "emi.cli", "features", "extract"],
}
SIGNAL_DELAY_S = 120  # the trainer needs one step and one checkpoint; Slurm kills the job at its time limit
MAX_TIMEOUT_REQUEUES = 20  # a long run is meant to continue over many time-limited jobs (submitit's default: 3)
POLL_S = 1.0
RESEND_STOP_S = 5.0
LOG_TAIL_LINES = 40


@dataclasses.dataclass
class NodeJob(submitit.helpers.Checkpointable):
    """What every node of the job runs: `program` (the entry point and its arguments) under `accelerate launch`."""

    program: list[str]
    gpus_per_node: int
    workdir: str

    def __call__(self) -> None:
        env = submitit.JobEnvironment()
        restart_count = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        command = node_command(self.program, self.gpus_per_node, env, master_address(env), restart_count)
        print(f"node {env.node} of {env.num_nodes} runs: {shlex.join(command)}", flush=True)
        self._child = subprocess.Popen(command, cwd=self.workdir, env=child_environment(self.gpus_per_node),
                                       preexec_fn=_ignore_stop_signals)
        try:
            # poll, not wait(): checkpoint() runs in submitit's signal handler meanwhile and waits for the child
            # itself, which a blocked wait() here would prevent (it holds the Popen's wait lock)
            while (returncode := self._child.poll()) is None:
                time.sleep(POLL_S)
        finally:
            if self._child.poll() is None:  # interrupted (cancelled local job): let the trainers checkpoint
                signal_trainers(self._child, signal.SIGTERM)
        if returncode != 0:
            raise RuntimeError(f"node {env.node}: `{shlex.join(command)}` exited with {returncode}; "
                               f"last lines of {env.paths.stderr}:\n{log_tail(env.paths.stderr)}")

    def checkpoint(self) -> DelayedSubmission:
        """Called by submitit on task 0 when the job is preempted or near its time limit: stop the trainers at a
        checkpoint (all ranks agree on the stop, so the other nodes stop too), then have submitit requeue."""
        child = getattr(self, "_child", None)
        while child is not None and child.poll() is None:
            # resent: a trainer that is still starting up ignores SIGUSR1 until it installs its handler
            signal_trainers(child, signal.SIGUSR1)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=RESEND_STOP_S)
        return DelayedSubmission(dataclasses.replace(self))  # a fresh job: the child process does not pickle


@dataclasses.dataclass
class ShardTask(submitit.helpers.Checkpointable):
    """Task `index` of a job-array shard build: `emi shards build ARGS --num-tasks count --task-index index`."""

    build_args: list[str]
    index: int
    count: int
    workdir: str

    def __call__(self) -> int:
        command = [sys.executable, "-m", "emi.cli", "shards", "build", *self.build_args, "--num-tasks",
                   str(self.count), "--task-index", str(self.index)]
        print(f"task {self.index} of {self.count} runs: {shlex.join(command)}", flush=True)
        returncode = subprocess.run(command, cwd=self.workdir, env=child_environment(0)).returncode
        if returncode not in (EXIT_OK, EXIT_PARTIAL):  # 3: some clips failed, which a re-run cannot change
            raise RuntimeError(f"task {self.index}: `{shlex.join(command)}` exited with {returncode}")
        return returncode


def node_command(program: list[str], gpus_per_node: int, env: submitit.JobEnvironment, master_addr: str,
                 restart_count: int) -> list[str]:
    """The `accelerate launch` one node runs, as slurm/launch.sh builds it in accelerate mode."""
    procs_per_node = max(1, gpus_per_node)
    num_processes = env.num_nodes * procs_per_node
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", str(env.num_nodes),
               "--machine_rank", str(env.node), "--num_processes", str(num_processes),
               "--main_process_ip", master_addr,
               "--main_process_port", str(master_port(int(env.raw_job_id), restart_count)),
               "--rdzv_backend", "static", "--deepspeed_multinode_launcher", "standard"]
    if num_processes > 1:
        command.append("--multi_gpu")  # torchrun underneath; on CPU the trainer picks gloo
    return command + program


def master_port(job_id: int, restart_count: int) -> int:
    """The port slurm/launch.sh picks: distinct for concurrent jobs and for each restart of one job, and below
    Linux's ephemeral range (32768+)."""
    return 20000 + (job_id * 10 + restart_count % 10) % 12000


def master_address(env: submitit.JobEnvironment) -> str:
    """Where rank 0 listens: the job's first node, or its NodeAddr from Slurm where the name does not resolve
    (the local test cluster's n1, n2)."""
    if env.num_nodes == 1:
        return "127.0.0.1"
    host = env.hostnames[0]
    try:
        socket.gethostbyname(host)
        return host
    except socket.gaierror:
        shown = subprocess.run(["scontrol", "show", "node", "-o", host], capture_output=True, text=True,
                               check=True).stdout
        addresses = [field.split("=", 1)[1] for field in shown.split() if field.startswith("NodeAddr=")]
        if not addresses:
            raise RuntimeError(f"node {host} does not resolve and scontrol shows no NodeAddr for it") from None
        return addresses[0]


def child_environment(gpus_per_node: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    if gpus_per_node == 0:
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed on a CPU-only node (the trainer picks gloo)
    return env


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m emi.launch", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--config", help="run config (stage1, stage2)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=None,
                        help="one training process per GPU; 0: one process per node on the CPU (not for shards)")
    parser.add_argument("--tasks", type=int, default=None, help="shards: array tasks, each building a slice")
    parser.add_argument("--retries", type=int, default=1, help="shards: times to submit again the tasks that did not "
                        "complete (default 1)")
    parser.add_argument("--cpus-per-node", type=int, default=None, help="default: 10 per process")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--time", type=int, default=24 * 60, help="time limit in minutes (default 24 h)")
    parser.add_argument("--local", action="store_true", help="run on this machine with submitit's LocalExecutor")
    parser.add_argument("--log-dir", type=Path, default=Path("logs/submitit"),
                        help="submitit's folder: <job id>_<task>_log.out/err and its pickles")
    parser.add_argument("args", nargs="*", metavar="ARG",
                        help="config overrides (section.key=value); for features, after --: its arguments")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    if args.stage == "shards":
        if args.config is not None or args.gpus_per_node is not None or args.nodes != 1:
            parser.error("shards takes --tasks, not --config, --gpus-per-node or --nodes (each task is one node): "
                         "pass the build's arguments after --")
        if args.tasks is None or args.tasks < 1 or args.retries < 0:
            parser.error(f"shards needs --tasks >= 1 and --retries >= 0, got {args.tasks} and {args.retries}")
        args.gpus_per_node = 0
        return args
    if args.gpus_per_node is None:
        parser.error(f"{args.stage} needs --gpus-per-node")
    if args.stage == "features":
        if args.config is not None:
            parser.error("features takes no --config: pass --encoders, --shards, --out after --")
    elif args.config is None:
        parser.error(f"{args.stage} needs --config")
    else:
        try:
            args.config = os.path.abspath(resolve_config_path(args.config))  # the nodes may start elsewhere
        except UsageError as err:
            parser.error(f"--config: {err}")
    if args.nodes < 1 or args.gpus_per_node < 0 or args.time < 1:
        parser.error(f"--nodes {args.nodes}, --gpus-per-node {args.gpus_per_node}, --time {args.time}: need "
                     "nodes >= 1, GPUs >= 0, minutes >= 1")
    if args.cpus_per_node is not None and args.cpus_per_node < 1:
        parser.error(f"--cpus-per-node {args.cpus_per_node}: need at least 1")
    if args.local and args.nodes != 1:
        parser.error(f"--local runs on this machine only: --nodes {args.nodes} needs a Slurm cluster")
    return args


def program(args: argparse.Namespace) -> list[str]:
    """The entry point and its arguments, as every node runs them."""
    if args.stage == "features":
        return [*ENTRY_POINTS["features"], *args.args]
    return [*ENTRY_POINTS[args.stage], "--config", args.config, "--resume", "latest", *args.args]


def run_dir(args: argparse.Namespace) -> Path:
    """Validates the config and overrides before the job waits in the queue; returns the run's folder."""
    schema = {"stage1": Stage1Config, "stage2": Stage2Config}[args.stage]
    config = load_config(schema, args.config, args.args)
    check_model_options(config)
    return Path(config.run.output_dir) / config.run.name


def run_shards(args: argparse.Namespace) -> int:
    """Submit the array, wait, submit again what did not complete, merge; returns the merge's exit code."""
    from emi.cli import build_parser
    from emi.shards.merge import merge_shards, read_partials

    build = build_parser().parse_args(["shards", "build", *args.args])  # bad arguments exit 2 before submitting
    if build.num_tasks is not None or build.task_index is not None:
        raise UsageError("shards: --tasks sets the array; leave --num-tasks and --task-index out")
    cpus = args.cpus_per_node or 10
    given_workers = any(arg == "--workers" or arg.startswith("--workers=") for arg in args.args)
    build_args = list(args.args) if given_workers else [*args.args, "--workers", str(cpus)]
    executor = submitit.AutoExecutor(folder=args.log_dir, cluster="local" if args.local else "slurm")
    executor.update_parameters(name="emi-shards", nodes=1, tasks_per_node=1, cpus_per_task=cpus,
                               timeout_min=args.time, slurm_partition=args.partition,
                               slurm_additional_parameters={"requeue": True})
    pending = list(range(args.tasks))
    for attempt in range(args.retries + 1):
        with executor.batch():
            jobs = {index: executor.submit(ShardTask(build_args, index, args.tasks, os.getcwd())) for index in pending}
        print(f"submitted shard tasks {pending} of {args.tasks} as jobs {[job.job_id for job in jobs.values()]}; "
              f"logs in {args.log_dir}", flush=True)
        for index, job in jobs.items():
            try:
                job.result()
            except Exception as err:  # noqa: BLE001 - a failed task is submitted again, or named by the merge
                lines = str(err).strip().splitlines()  # submitit's message holds the task's traceback
                reason = next((line for line in reversed(lines) if line.startswith("RuntimeError: ")), lines[0])
                print(f"task {index} (job {job.job_id}) failed: {reason}", flush=True)
        try:
            done = {index for index, partial in read_partials(build.out).items() if partial.task.complete}
        except UsageError:
            done = set()
        pending = [index for index in range(args.tasks) if index not in done]
        if not pending:
            break
        if attempt < args.retries:
            print(f"tasks {pending} did not complete: submitting them again", flush=True)
    summary = merge_shards(build.out)
    print(summary.describe(), flush=True)
    return EXIT_OK if summary.merged and summary.num_failed == 0 else EXIT_PARTIAL


def submitit_executor(log_dir: Path, local: bool, name: str, nodes: int, gpus_per_node: int, cpus_per_node: int,
                      minutes: int, partition: str | None, **parameters: object) -> submitit.AutoExecutor:
    """The executor for NodeJobs: Slurm (requeueable, warned SIGNAL_DELAY_S before the time limit) or, with
    `local`, this machine. `parameters`: more submitit parameters (slurm_array_parallelism)."""
    executor = submitit.AutoExecutor(folder=log_dir, cluster="local" if local else "slurm",
                                     slurm_max_num_timeout=MAX_TIMEOUT_REQUEUES)
    executor.update_parameters(
        name=name, nodes=nodes, tasks_per_node=1, gpus_per_node=gpus_per_node, cpus_per_task=cpus_per_node,
        timeout_min=minutes, slurm_partition=partition, slurm_signal_delay_s=SIGNAL_DELAY_S,
        slurm_additional_parameters={"requeue": True},
        # srun does not pass the allocation's CPUs per task on to the step (Slurm 22.05+); kill-on-bad-exit:
        # a node that fails must not leave the others waiting in a collective.
        slurm_srun_args=[f"--cpus-per-task={cpus_per_node}", "--kill-on-bad-exit=1"], **parameters,
    )
    return executor


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stage == "shards":
        try:
            return run_shards(args)
        except UsageError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_USAGE
    try:
        run = None if args.stage == "features" else run_dir(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE

    procs_per_node = max(1, args.gpus_per_node)
    cpus_per_node = args.cpus_per_node or 10 * procs_per_node
    executor = submitit_executor(args.log_dir, args.local, f"emi-{args.stage}", args.nodes, args.gpus_per_node,
                                 cpus_per_node, args.time, args.partition)
    job = executor.submit(NodeJob(program=program(args), gpus_per_node=args.gpus_per_node, workdir=os.getcwd()))

    where = "locally" if args.local else "to Slurm"
    print(f"submitted {args.stage} {where} as job {job.job_id}: {args.nodes} node(s) x {procs_per_node} "
          f"process(es), {cpus_per_node} CPUs and {args.gpus_per_node} GPUs per node")
    print(f"follow it: tail -f {job.paths.stdout} {job.paths.stderr}")
    if run is not None:
        print(f"run folder: {run} (log {run / 'log.txt'}; tensorboard --logdir {run / 'tb'})")
    return 0


if __name__ == "__main__":
    # Submit the class from the importable module, not from __main__, so the job unpickles it by reference.
    from emi.launch import main as launch_main

    sys.exit(launch_main())
