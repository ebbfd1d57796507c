"""Running a sweep's cells: on Slurm as one submitit job array (at most `slurm.parallelism` at once), or on this
machine with submitit's LocalExecutor; waiting for them, saying how each ended, one sweep at a time per folder."""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from emi.cluster import ENTRY_POINTS, NodeJob, submitit_executor
from emi.config import save_config
from emi.data.urls import feature_shards
from emi.errors import StoppedError, UsageError
from emi.io import write_json_atomic
from emi.sweep.plan import Cell, Sweep, check_run_folder, expand, load_sweep
from emi.sweep.report import collect

# Slurm job states after which a job does not run again by itself. Not PREEMPTED, which a requeued job may pass
# through: a job preempted for good waits until Slurm forgets it (MinJobAge) and squeue no longer shows it.
ENDED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "SPECIAL_EXIT",
    "REVOKED",
}
SLURM_POLL_S = 10.0
LOCAL_POLL_S = 1.0


def queued_jobs(job_ids: set[str]) -> set[str]:
    """Those of `job_ids` (Slurm job ids, array tasks as 123_4) that are pending, running or being requeued."""
    if not job_ids or shutil.which("squeue") is None:
        return set()
    result = subprocess.run(
        ["squeue", "--noheader", "--array", "--states=all", f"--user={getpass.getuser()}", "--format=%i %T"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        raise RuntimeError(f"squeue failed ({result.returncode}): {result.stderr.strip()}")
    states = dict(line.split(maxsplit=1) for line in result.stdout.splitlines() if line.strip())
    return {job for job in job_ids if job in states and states[job].strip() not in ENDED}


def read_jobs(sweep: Sweep) -> dict[str, str]:
    """{cell name: Slurm job id} of the sweep's submissions so far."""
    path = sweep.folder / "jobs.json"
    return json.loads(path.read_text()) if path.is_file() else {}


@contextmanager
def sweep_lock(folder: Path) -> Iterator[None]:
    """One `emi sweep` at a time per sweep folder (two would train the same cells into the same folders)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "sweep.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(
                f"another emi sweep is running on {folder}; wait for it, or run `emi sweep --collect` "
                "for the table so far"
            ) from None
        yield


def cell_job(sweep: Sweep, cell: Cell):
    """What a cell's job runs: the Stage II entry point on every node (emi.cluster.NodeJob), always `--resume
    latest`."""
    return NodeJob(
        program=[*ENTRY_POINTS["stage2"], "--config", str(sweep.base), "--resume", "latest", *cell.overrides],
        gpus_per_node=sweep.config.slurm.gpus_per_node,
        workdir=os.getcwd(),
    )


def cell_executor(sweep: Sweep, local: bool, num_cells: int):
    slurm = sweep.config.slurm
    procs_per_node = max(1, slurm.gpus_per_node)
    return submitit_executor(
        sweep.folder / "submitit",
        local,
        name=f"emi-sweep-{sweep.config.name}",
        nodes=slurm.nodes,
        gpus_per_node=slurm.gpus_per_node,
        cpus_per_node=slurm.cpus_per_node or 10 * procs_per_node,
        minutes=slurm.time,
        partition=slurm.partition,
        slurm_array_parallelism=slurm.parallelism or num_cells,
    )


def check_data(sweep: Sweep, cells: list[Cell]) -> None:
    """The feature shards the cells to run train on exist and are features, before anything is queued."""
    for name in dict.fromkeys(cell.dataset for cell in cells):
        data = sweep.config.data[name]
        for split, shards in (("train", data.train), ("val", data.val)):
            try:
                feature_shards(shards, None, f"data.{name}.{split}")
            except UsageError as err:
                raise UsageError(f"{sweep.source}: {err}") from None


TRAINER_ERROR = re.compile(r"^(?:\[rank\d+\]: )?(?:emi: )?error: (.+)$")  # what the trainer says as it stops
EXCEPTION = re.compile(r"^(?:\[rank\d+\]: )?([A-Za-z_.]*(?:Error|Exception): .+)$")


def failure_reason(log: Path) -> str:
    """Why a cell's job failed, in one line, from its log: the trainer's last `error: ...` line, else the last
    exception's."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    except OSError:
        return "its job left no log"
    for pattern in (TRAINER_ERROR, EXCEPTION):
        reasons = [match.group(1) for line in lines if (match := pattern.match(line))]
        if reasons:
            return reasons[-1]
    return "no error line in its log"


def report_ended(cell: Cell, log: Path) -> None:
    if cell.finished():
        print(f"cell {cell.name}: finished", flush=True)
        return
    logs = [str(path) for path in (log, cell.run_dir / "log.txt") if path.is_file()]
    print(
        f"cell {cell.name}: ended before finishing: {failure_reason(log)}"
        + (f" (see {' and '.join(logs)})" if logs else ""),
        flush=True,
    )


def run_on_slurm(sweep: Sweep, cells: list[Cell], queued: dict[Cell, str]) -> None:
    """Submit `cells` as one job array, then wait until neither they nor the `queued` ones (cell -> job id,
    from an earlier submission) are pending or running."""
    jobs = dict(queued)
    if cells:
        executor = cell_executor(sweep, local=False, num_cells=len(cells))
        with executor.batch():
            submitted = [executor.submit(cell_job(sweep, cell)) for cell in cells]
        jobs.update({cell: job.job_id for cell, job in zip(cells, submitted)})
        write_json_atomic(sweep.folder / "jobs.json", {**read_jobs(sweep), **{c.name: job for c, job in jobs.items()}})
        print(
            f"submitted {len(cells)} cells to Slurm as job array {submitted[0].job_id.split('_')[0]} "
            f"(at most {sweep.config.slurm.parallelism or len(cells)} at once); logs in {sweep.folder / 'submitit'}",
            flush=True,
        )
    print(
        f"waiting for {len(jobs)} cells (Ctrl-C stops the waiting, not the cells: the same command waits again)",
        flush=True,
    )
    waiting = set(jobs)
    while waiting:
        time.sleep(SLURM_POLL_S)
        try:
            active = queued_jobs({jobs[cell] for cell in waiting})
        except (RuntimeError, subprocess.TimeoutExpired) as err:  # the controller is busy or restarting: ask again
            print(f"warning: {err}", flush=True)
            continue
        for cell in sorted((cell for cell in waiting if jobs[cell] not in active), key=lambda cell: cell.name):
            waiting.remove(cell)
            report_ended(cell, sweep.folder / "submitit" / f"{jobs[cell]}_0_log.err")


def run_locally(sweep: Sweep, cells: list[Cell]) -> None:
    """Run `cells` on this machine, at most slurm.parallelism at once, through submitit's LocalExecutor."""
    if sweep.config.slurm.nodes != 1:
        raise UsageError(f"{sweep.source}: --local runs each cell on this machine: slurm.nodes must be 1")
    executor = cell_executor(sweep, local=True, num_cells=len(cells))
    limit = sweep.config.slurm.parallelism or len(cells)
    pending, running = list(cells), {}
    # Stopped (Ctrl-C, kill), this process cancels its jobs, which stop their trainers at a checkpoint (NodeJob):
    # cells left running would train beside the next `emi sweep`. Cancelling is a SIGINT, which the jobs heed only
    # if this process did not start with it ignored (a background job of a shell script).
    stop_signals = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while pending or running:
            for cell, job in list(running.items()):
                if job.done():
                    del running[cell]
                    report_ended(cell, Path(job.paths.stderr))
            while pending and len(running) < limit:
                cell = pending.pop(0)
                running[cell] = executor.submit(cell_job(sweep, cell))
                print(f"cell {cell.name}: started (log {running[cell].paths.stderr})", flush=True)
            time.sleep(LOCAL_POLL_S)
    except KeyboardInterrupt:
        raise StoppedError(
            f"stopped; the running cells stop at a checkpoint ({', '.join(c.name for c in running)}) "
            "and the same command continues them"
        ) from None
    finally:
        for job in running.values():
            job.cancel()
        for signum, handler in stop_signals.items():
            signal.signal(signum, handler)


def run_sweep(path: str | Path, overrides: list[str] = (), local: bool = False, collect_only: bool = False) -> int:
    """`emi sweep`: run the cells not finished yet, wait for them, write the results. EXIT_OK when every cell
    finished, EXIT_PARTIAL when some did not (the table covers the others)."""
    sweep = load_sweep(path, overrides)
    cells = expand(sweep)
    for cell in cells:
        check_run_folder(cell, sweep.source)
    if collect_only:
        return collect(sweep, cells)
    with sweep_lock(sweep.folder):
        save_config(sweep.config, sweep.folder / "sweep.yaml")
        recorded = read_jobs(sweep)
        unfinished = [cell for cell in cells if not cell.finished()]
        queued_ids = queued_jobs({recorded[cell.name] for cell in unfinished if cell.name in recorded})
        queued = {cell: recorded[cell.name] for cell in unfinished if recorded.get(cell.name) in queued_ids}
        to_run = [cell for cell in unfinished if cell not in queued]
        print(
            f"sweep {sweep.config.name}: {len(cells)} cells in {sweep.folder}: {len(cells) - len(unfinished)} "
            f"finished, {len(queued)} still queued, {len(to_run)} to run",
            flush=True,
        )
        if to_run:
            check_data(sweep, to_run)
        if local:
            run_locally(sweep, to_run)
        elif to_run or queued:
            run_on_slurm(sweep, to_run, queued)
        return collect(sweep, cells)
