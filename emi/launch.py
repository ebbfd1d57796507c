"""Submit a training stage or the feature extraction to Slurm with submitit; the job requeues itself when preempted
or near its time limit and resumes from its newest checkpoint.

    python -m emi.launch {stage1,stage2} --config FILE --nodes N --gpus-per-node G [--cpus-per-node C]
        [--partition P] [--time MIN] [--local] [--log-dir DIR] [section.key=value ...]
    python -m emi.launch features --nodes N --gpus-per-node G [...] -- --encoders DIR --shards URL --out DIR
    python -m emi.launch shards --tasks N [--cpus-per-node C] [--retries R] [...] -- --videos DIR --labels CSV --out OUT

One submitit task per node starts the node's `accelerate launch` (emi.cluster.NodeJob: machine rank and rendezvous
from submitit.JobEnvironment) as a child process, always with `--resume latest` for the training stages, so every
(re)start continues where the last checkpoint left off; preempted or near its time limit, the job stops its
trainers at a checkpoint and requeues itself.

The job runs in the directory it was submitted from, like sbatch: relative paths in the config and the overrides
resolve there. `--local` runs the job on this machine with submitit's LocalExecutor (one node), for development.
Both modes print the job id and the log to follow, and return while the job runs (a local job's controller
inherits stdout: a pipe that reads it stays open until the job ends).

`shards` is different: it submits an array of N one-node jobs, task I running `emi shards build ... --num-tasks N
--task-index I` (emi.shards.build), waits for them, submits again the tasks whose partial manifest is not complete
(up to --retries times; a re-run task keeps its complete shards, and a preempted one is requeued by submitit), then
merges (emi.shards.merge) and exits with the merge's code: 0, or 3 when clips failed or tasks never completed.

`emi sweep` (emi/sweep/) submits its Stage II cells as one job array of the same NodeJobs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import submitit

from emi.cluster import ENTRY_POINTS, NodeJob, ShardTask, submitit_executor
from emi.config import Stage1Config, Stage2Config, load_config, resolve_config_path
from emi.errors import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, UsageError
from emi.models.options import check_model_options
from emi.shards.arguments import parse_build_arguments
from emi.shards.merge import merge_shards, read_partials

STAGES = ("stage1", "stage2", "features", "shards")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m emi.launch", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--config", help="run config (stage1, stage2)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="one training process per GPU; 0: one process per node on the CPU (not for shards)",
    )
    parser.add_argument("--tasks", type=int, default=None, help="shards: array tasks, each building a slice")
    parser.add_argument(
        "--retries",
        type=int,
        default=1,
        help="shards: times to submit again the tasks that did not complete (default 1)",
    )
    parser.add_argument("--cpus-per-node", type=int, default=None, help="default: 10 per process")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--time", type=int, default=24 * 60, help="time limit in minutes (default 24 h)")
    parser.add_argument("--local", action="store_true", help="run on this machine with submitit's LocalExecutor")
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=Path("logs/submitit"),
        help="submitit's folder: <job id>_<task>_log.out/err and its pickles",
    )
    parser.add_argument(
        "args",
        nargs="*",
        metavar="ARG",
        help="config overrides (section.key=value); for features, after --: its arguments",
    )
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    if args.stage == "shards":
        if args.config is not None or args.gpus_per_node is not None or args.nodes != 1:
            parser.error(
                "shards takes --tasks, not --config, --gpus-per-node or --nodes (each task is one node): "
                "pass the build's arguments after --"
            )
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
        parser.error(
            f"--nodes {args.nodes}, --gpus-per-node {args.gpus_per_node}, --time {args.time}: need "
            "nodes >= 1, GPUs >= 0, minutes >= 1"
        )
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
    build = parse_build_arguments(args.args)  # bad arguments exit 2 before submitting
    if build.num_tasks is not None or build.task_index is not None:
        raise UsageError("shards: --tasks sets the array; leave --num-tasks and --task-index out")
    cpus = args.cpus_per_node or 10
    given_workers = any(arg == "--workers" or arg.startswith("--workers=") for arg in args.args)
    build_args = list(args.args) if given_workers else [*args.args, "--workers", str(cpus)]
    executor = submitit.AutoExecutor(folder=args.log_dir, cluster="local" if args.local else "slurm")
    executor.update_parameters(
        name="emi-shards",
        nodes=1,
        tasks_per_node=1,
        cpus_per_task=cpus,
        timeout_min=args.time,
        slurm_partition=args.partition,
        slurm_additional_parameters={"requeue": True},
    )
    pending = list(range(args.tasks))
    for attempt in range(args.retries + 1):
        with executor.batch():
            jobs = {index: executor.submit(ShardTask(build_args, index, args.tasks, os.getcwd())) for index in pending}
        print(
            f"submitted shard tasks {pending} of {args.tasks} as jobs {[job.job_id for job in jobs.values()]}; "
            f"logs in {args.log_dir}",
            flush=True,
        )
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
    executor = submitit_executor(
        args.log_dir,
        args.local,
        f"emi-{args.stage}",
        args.nodes,
        args.gpus_per_node,
        cpus_per_node,
        args.time,
        args.partition,
    )
    job = executor.submit(NodeJob(program=program(args), gpus_per_node=args.gpus_per_node, workdir=os.getcwd()))

    where = "locally" if args.local else "to Slurm"
    print(
        f"submitted {args.stage} {where} as job {job.job_id}: {args.nodes} node(s) x {procs_per_node} "
        f"process(es), {cpus_per_node} CPUs and {args.gpus_per_node} GPUs per node"
    )
    print(f"follow it: tail -f {job.paths.stdout} {job.paths.stderr}")
    if run is not None:
        print(f"run folder: {run} (log {run / 'log.txt'}; tensorboard --logdir {run / 'tb'})")
    return 0


if __name__ == "__main__":
    # Submit the class from the importable module, not from __main__, so the job unpickles it by reference.
    from emi.launch import main as launch_main

    sys.exit(launch_main())
