"""`emi sweep`: many Stage II runs from one file, as one Slurm job array (or on this machine), ending in one table.

    emi sweep --config configs/sweeps/ablation.yaml [--local] [--collect] [key=value ...]

A sweep file (emi.config.SweepConfig) names the Stage II config every cell starts from (`base`), the feature shards
(`data`, by name), settings common to every cell (`overrides`), named variants (`cells`) and a `grid` (the
cartesian product of its values, crossed with the named cells), and `repeat` axes (seeds, folds) every variant runs
over and the table aggregates. `expand` turns it into cells, each one Stage II run in its own folder,
<sweep>/cells/<variant>[/<repeat>], named from its settings (`modules-tfe/seed-2`, `fusion-mean_lr-0.001`).

A cell is finished when its run folder says so: the trainer writes `export/` once, when the run ends, and `best/`
(with the val metrics in trainer.json) at its best epoch. The other cells go to Slurm as one submitit job array
(at most `slurm.parallelism` at once), each task emi.launch's NodeJob running `accelerate launch -m
emi.stages.stage2 --config BASE --resume latest OVERRIDES`, so a preempted, requeued or timed-out cell continues
from its last checkpoint; `--local` runs them with submitit's LocalExecutor on this machine instead. The command
waits until no cell is queued or running, then `collect` writes <sweep>/results.{csv,md} (per variant: mean and
std over the repeats of every val metric; the best variant and the best cell), cells.csv, the top-k ensemble
(ensemble.json) and TensorBoard HParams (<sweep>/hparams). Run again, it runs only the cells not finished (and
waits for those still queued from an earlier submission, which <sweep>/jobs.json records); `--collect` only
writes the table from the cells finished so far.
"""
from __future__ import annotations

import copy
import csv
import fcntl
import getpass
import io
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from emi.config import (
    Stage2Config, SweepConfig, build_config, config_to_dict, parse_override, read_config_file, resolve_config_path,
    save_config, set_dotted)
from emi.errors import EXIT_OK, EXIT_PARTIAL, StoppedError, UsageError
from emi.io import write_atomic, write_json_atomic
from emi.models.options import check_fusion_options

DATASET = "dataset"  # the key of a cell or grid that picks one of the sweep's `data`
SET_BY_SWEEP = ("run.name", "run.output_dir", "data.train", "data.val")  # the cell's folder and its `data`
NOT_COMPARED = ("train.resume", "train.trust_checkpoint")  # how a cell (re)starts, not what it trains
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
# Slurm job states after which a job does not run again by itself. Not PREEMPTED, which a requeued job may pass
# through: a job preempted for good waits until Slurm forgets it (MinJobAge) and squeue no longer shows it.
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "SPECIAL_EXIT", "REVOKED"}
SLURM_POLL_S = 10.0
LOCAL_POLL_S = 1.0
NOT_METRICS = ("step", "epoch", "num_samples")  # trainer.json entries that are not val metrics
DATA_IDENTITY = ("train", "val", "manifest", "folds", "fold")  # the data keys that decide which clips a run sees


@dataclass
class Sweep:
    config: SweepConfig
    source: str  # the sweep file, for messages
    folder: Path  # <output_dir>/<name>
    base: Path  # the Stage II config every cell starts from: config.base found beside the sweep file, or shipped


@dataclass(eq=False)  # compared and hashed by identity: one object per cell
class Cell:
    name: str  # <variant> or <variant>/<repeat>: its run folder below <sweep>/cells
    variant: str
    dataset: str
    settings: dict[str, Any]  # what it was given beyond `overrides`: its named cell's, grid and repeat values
    overrides: list[str]  # the Stage II command-line overrides, in order
    config: dict[str, Any]  # the resolved Stage II config it trains with
    run_dir: Path

    def metrics(self) -> dict[str, float]:
        """The val metrics of its best epoch (best/trainer.json)."""
        best = json.loads((self.run_dir / "best" / "trainer.json").read_text())
        return {key: value for key, value in best.items() if key not in NOT_METRICS}

    def finished(self) -> bool:
        return all((self.run_dir / folder / "trainer.json").is_file() for folder in ("export", "best"))


# ----------------------------------------------------------------------------------------------------- loading

def load_sweep(path: str | Path, overrides: list[str] = ()) -> Sweep:
    """Read and check a sweep file (a path or a shipped name); `overrides` are `key=value` on the sweep file itself
    (see `set_sweep_key`)."""
    path = resolve_config_path(path)
    raw = read_config_file(path)
    for override in overrides:
        set_sweep_key(raw, *parse_override(override), override)
    config = build_config(SweepConfig, raw, str(path))
    check_sweep(config, str(path))
    try:
        base = Path(os.path.abspath(resolve_config_path(config.base, beside=Path(path).parent)))
    except UsageError as err:
        raise UsageError(f"{path}: base: {err}") from None
    return Sweep(config, str(path), Path(config.output_dir) / config.name, base)


def set_sweep_key(raw: dict[str, Any], key: str, value: Any, override: str) -> None:
    """As emi.config.set_dotted, except that below `overrides`, `grid`, `repeat` and `cells.NAME` the rest of the
    key is one run-config key: `overrides.train.epochs=3`, `grid.model.fusion=[qam,mean]`, `cells.full.run.seed=1`."""
    head, _, rest = key.partition(".")
    if head == "cells" and "." in rest:
        name, _, rest = rest.partition(".")
        cells = raw.setdefault("cells", {})
        section = cells.setdefault(name, {}) if isinstance(cells, dict) else None
    elif head in ("overrides", "grid", "repeat") and rest:
        section = raw.setdefault(head, {})
    else:
        set_dotted(raw, key, value, override)
        return
    if not isinstance(section, dict):
        raise UsageError(f"override {override!r}: {key.rsplit('.', 1)[0]} is not a mapping")
    section[rest] = value


def check_sweep(config: SweepConfig, source: str) -> None:
    if not config.base:
        raise UsageError(f"{source}: base names no Stage II config: give the file every cell starts from (relative "
                         "to the sweep file, or a shipped name such as stage2/tiny.yaml)")
    for what, name in [("name", config.name)] + [("data", name) for name in config.data] + [
            ("cells", name) for name in config.cells]:
        if not NAME.fullmatch(str(name)):
            raise UsageError(f"{source}: {what} {name!r}: use letters, digits and . _ + - (it names folders)")
    if not config.data:
        raise UsageError(f"{source}: data names no feature shards; give at least one: data: {{NAME: {{train: "
                         "DIR, val: DIR}}}}")
    for name, data in config.data.items():
        if not data.train or not data.val:
            raise UsageError(f"{source}: data.{name} needs both train and val (cells are ranked on val)")
    sections = {"overrides": config.overrides, "grid": config.grid, "repeat": config.repeat,
                **{f"cells.{name}": settings for name, settings in config.cells.items()}}
    for where, settings in sections.items():
        for key in settings:
            if key in SET_BY_SWEEP:
                raise UsageError(f"{source}: {where}.{key}: the sweep sets {key} itself (the cell's folder, or "
                                 f"the data the cell's `{DATASET}` names)")
            if key == DATASET and where in ("overrides", "repeat"):
                raise UsageError(f"{source}: {where}.{DATASET}: a cell's data is chosen in cells or grid")
    for where in ("grid", "repeat"):
        for key, values in getattr(config, where).items():
            if not values:
                raise UsageError(f"{source}: {where}.{key} has no values")
    datasets = [settings[DATASET] for settings in config.cells.values() if DATASET in settings]
    for name in datasets + list(config.grid.get(DATASET, [])):
        if name not in config.data:
            raise UsageError(f"{source}: {DATASET} {name!r} is not one of data: {list(config.data)}")
    for name, settings in config.cells.items():
        for key in settings:
            if key in config.grid or key in config.repeat:
                raise UsageError(f"{source}: {key} is set both in cells.{name} and in "
                                 f"{'grid' if key in config.grid else 'repeat'}; set it in one place")
    both = sorted(set(config.grid) & set(config.repeat))
    if both:
        raise UsageError(f"{source}: {both[0]} is both in grid and in repeat; set it in one place")
    if not (config.metric.startswith("pearson/") or config.metric.startswith("mean_pearson")):
        raise UsageError(f"{source}: metric {config.metric!r}: rank by a val Pearson metric (mean_pearson, "
                         "mean_pearson_without_<modality>, pearson/<label>): higher is better")
    slurm = config.slurm
    if config.top_k < 0 or slurm.nodes < 1 or slurm.gpus_per_node < 0 or slurm.time < 1 or slurm.parallelism < 0 or (
            slurm.cpus_per_node is not None and slurm.cpus_per_node < 1):
        raise UsageError(f"{source}: need top_k >= 0, slurm.nodes >= 1, slurm.gpus_per_node >= 0, slurm.time >= 1, "
                         f"slurm.parallelism >= 0 and slurm.cpus_per_node >= 1 (or null)")


# --------------------------------------------------------------------------------------------------- expansion

def override(key: str, value: Any) -> str:
    """`key=value` as the stage's command line reads it back (YAML), whatever the value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def slug(value: Any) -> str:
    """A value as a piece of a folder name: lists joined with '+', YAML spelling (true, null), unsafe characters
    replaced with '-'."""
    if isinstance(value, list):
        return "+".join(slug(item) for item in value)
    text = value if isinstance(value, str) else override("", value)[1:]
    return re.sub(r"[^A-Za-z0-9.+-]", "-", text)


def labels(keys: list[str]) -> dict[str, str]:
    """Short names of dotted keys for cell names: the last part (`run.seed` -> `seed`), or the whole key where two
    keys end alike."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: short if last.count(short) == 1 else key for key, short in zip(keys, last)}


def product(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the axes' values, the first axis slowest ([{}] for no axes)."""
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def expand(sweep: Sweep) -> list[Cell]:
    """The sweep's cells, in a fixed order: named cells (in file order) x grid points x repeats. Each cell's Stage
    II config is built and checked here, so a bad key or value fails before anything runs."""
    config, source = sweep.config, sweep.source
    base = read_config_file(sweep.base)
    grid_labels, repeat_labels = labels(list(config.grid)), labels(list(config.repeat))

    def resolved(overrides: list[str], where: str) -> dict[str, Any]:
        """The Stage II config of these overrides, checked as its run would check it, the model's shape included."""
        raw = copy.deepcopy(base)
        for text in overrides:
            set_dotted(raw, *parse_override(text), text)
        config = build_config(Stage2Config, raw, f"{source}: {where}")
        try:
            check_fusion_options(config.model)
        except UsageError as err:
            raise UsageError(f"{source}: {where}: {err}") from None
        return config_to_dict(config)

    # Each section on its own first, so that a bad key is named where it is written.
    common = [override(key, value) for key, value in config.overrides.items()]
    resolved(common, "overrides")
    for where, settings in [*((f"cells.{name}", s) for name, s in config.cells.items()),
                            *((f"grid.{key}", {key: v}) for key, values in config.grid.items() for v in values),
                            *((f"repeat.{key}", {key: v}) for key, values in config.repeat.items() for v in values)]:
        resolved(common + [override(key, value) for key, value in settings.items() if key != DATASET], where)

    cells: list[Cell] = []
    named = config.cells or {"": {}}
    for (cell_name, cell_settings), point in itertools.product(named.items(), product(config.grid)):
        variant = "_".join([cell_name] * bool(cell_name) + [
            f"{grid_labels[key]}-{slug(value)}" for key, value in point.items()]) or "base"
        dataset = point.get(DATASET, cell_settings.get(DATASET, next(iter(config.data))))
        data = config.data[dataset]
        for repeat in product(config.repeat):
            repeat_name = "_".join(f"{repeat_labels[key]}-{slug(value)}" for key, value in repeat.items())
            name = f"{variant}/{repeat_name}" if repeat_name else variant
            folder = sweep.folder / "cells" / variant
            run = ({"run.output_dir": str(folder), "run.name": repeat_name} if repeat_name else
                   {"run.output_dir": str(folder.parent), "run.name": variant})
            settings = {**cell_settings, **point, **repeat}
            overrides = common + [override("data.train", data.train), override("data.val", data.val)] + [
                override(key, value) for key, value in {**settings, **run}.items() if key != DATASET]
            cells.append(Cell(name=name, variant=variant, dataset=dataset, settings=settings, overrides=overrides,
                              config=resolved(overrides + ["train.resume=latest"], f"cell {name}"),
                              run_dir=folder / repeat_name if repeat_name else folder))
    seen: dict[str, Cell] = {}
    for cell in cells:
        if cell.name in seen:
            raise UsageError(f"{source}: two cells are both named {cell.name!r} ({seen[cell.name].settings} and "
                             f"{cell.settings}): values that differ only in characters a folder name cannot hold")
        seen[cell.name] = cell
    return cells


# ----------------------------------------------------------------------------------------------- cell folders

def dotted(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {dotted key: leaf value}."""
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_run_folder(cell: Cell, source: str) -> None:
    """A cell's folder that holds a run must hold this cell's run: the same config (UsageError otherwise), so that
    a changed sweep file never mixes old and new results or resumes a run under other settings. Keys the saved
    config lacks (added to the schema since) are not compared."""
    saved = cell.run_dir / "config.yaml"
    if not saved.is_file():
        return
    there, here = dotted(yaml.safe_load(saved.read_text()) or {}), dotted(cell.config)
    differing = [key for key in sorted(there) if key not in NOT_COMPARED and there[key] != here.get(key)]
    if differing:
        shown = "; ".join(f"{key}: {there.get(key)!r} there, {here.get(key)!r} now" for key in differing[:5])
        raise UsageError(f"{source}: {cell.run_dir} holds a run of cell {cell.name} with other settings ({shown}): "
                         "give the sweep another name (name=...), or remove that folder to train it again")


def queued_jobs(job_ids: set[str]) -> set[str]:
    """Those of `job_ids` (Slurm job ids, array tasks as 123_4) that are pending, running or being requeued."""
    if not job_ids or shutil.which("squeue") is None:
        return set()
    result = subprocess.run(["squeue", "--noheader", "--array", "--states=all", f"--user={getpass.getuser()}",
                             "--format=%i %T"], capture_output=True, text=True, timeout=120)
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
            raise UsageError(f"another emi sweep is running on {folder}; wait for it, or run `emi sweep --collect` "
                             "for the table so far") from None
        yield


# ------------------------------------------------------------------------------------------------------ running

def cell_job(sweep: Sweep, cell: Cell):
    """What a cell's job runs: emi.launch's NodeJob with the Stage II entry point, always `--resume latest`."""
    from emi.launch import ENTRY_POINTS, NodeJob

    return NodeJob(program=[*ENTRY_POINTS["stage2"], "--config", str(sweep.base), "--resume", "latest",
                            *cell.overrides], gpus_per_node=sweep.config.slurm.gpus_per_node, workdir=os.getcwd())


def cell_executor(sweep: Sweep, local: bool, num_cells: int):
    from emi.launch import submitit_executor

    slurm = sweep.config.slurm
    procs_per_node = max(1, slurm.gpus_per_node)
    return submitit_executor(
        sweep.folder / "submitit", local, name=f"emi-sweep-{sweep.config.name}", nodes=slurm.nodes,
        gpus_per_node=slurm.gpus_per_node, cpus_per_node=slurm.cpus_per_node or 10 * procs_per_node,
        minutes=slurm.time, partition=slurm.partition, slurm_array_parallelism=slurm.parallelism or num_cells)


def check_data(sweep: Sweep, cells: list[Cell]) -> None:
    """The feature shards the cells to run train on exist and are features, before anything is queued."""
    from emi.stages.stage2 import feature_shards

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
    print(f"cell {cell.name}: ended before finishing: {failure_reason(log)}"
          + (f" (see {' and '.join(logs)})" if logs else ""), flush=True)


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
        print(f"submitted {len(cells)} cells to Slurm as job array {submitted[0].job_id.split('_')[0]} "
              f"(at most {sweep.config.slurm.parallelism or len(cells)} at once); logs in {sweep.folder / 'submitit'}",
              flush=True)
    print(f"waiting for {len(jobs)} cells (Ctrl-C stops the waiting, not the cells: the same command waits again)",
          flush=True)
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
        raise StoppedError(f"stopped; the running cells stop at a checkpoint ({', '.join(c.name for c in running)}) "
                           "and the same command continues them") from None
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
        print(f"sweep {sweep.config.name}: {len(cells)} cells in {sweep.folder}: {len(cells) - len(unfinished)} "
              f"finished, {len(queued)} still queued, {len(to_run)} to run", flush=True)
        if to_run:
            check_data(sweep, to_run)
        if local:
            run_locally(sweep, to_run)
        elif to_run or queued:
            run_on_slurm(sweep, to_run, queued)
        return collect(sweep, cells)


# ---------------------------------------------------------------------------------------------------- results

def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def config_value(config: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        config = config[part]
    return config


def ensemble_report(checkpoints: list[Path], shards: str) -> dict[str, Any]:
    """Score the mean of the checkpoints' predictions on labelled feature shards, clip by clip (as `emi evaluate`
    with several checkpoints does); UsageError where they do not read the same features or predict the same
    labels."""
    from emi.serve.ensemble import load_ensemble
    from emi.serve.scoring import shard_predictions
    from emi.metrics import emi_report

    ensemble = load_ensemble(checkpoints)
    _, preds, target, _ = shard_predictions(ensemble, shards, workers=0)
    return emi_report(preds.mean(0), target, ensemble.record.labels)


def top_k_ensemble(sweep: Sweep, ranked: list[Cell]) -> dict[str, Any] | None:
    """The mean prediction of the k best cells that trained and validated on the same clips as the best one,
    scored on its val set."""
    if sweep.config.top_k == 0 or not ranked:
        return None

    def clips(cell: Cell) -> dict[str, Any]:
        return {key: cell.config["data"].get(key) for key in DATA_IDENTITY}

    best = ranked[0]
    members = [cell for cell in ranked if clips(cell) == clips(best)][:sweep.config.top_k]
    shards = best.config["data"]["val"]
    result: dict[str, Any] = {"members": [cell.name for cell in members], "val": shards}
    if best.config["data"].get("folds", 0) >= 2:  # their val set is a fold of train + val, not data.val
        result["error"] = "the cells validate on k-fold splits; ensemble a fold's cells with emi evaluate"
        return result
    try:
        result["report"] = ensemble_report([cell.run_dir / "best" for cell in members], shards)
    except UsageError as err:
        result["error"] = str(err)
    return result


def write_hparams(sweep: Sweep, cells: list[Cell], metrics: dict[str, dict[str, float]]) -> None:
    """One TensorBoard HParams session per finished cell under <sweep>/hparams (written afresh each time): every
    swept key with its value in that cell, and its val metrics."""
    from torch.utils.tensorboard import SummaryWriter

    folder = sweep.folder / "hparams"
    shutil.rmtree(folder, ignore_errors=True)
    keys = list(dict.fromkeys(key for cell in cells for key in cell.settings if key != DATASET))
    with SummaryWriter(str(folder)) as writer:
        for cell in cells:
            if cell.name not in metrics:
                continue
            values = {key: config_value(cell.config, key) for key in keys}
            hparams = {"variant": cell.variant, DATASET: cell.dataset, **{
                key: value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
                for key, value in values.items()}}
            writer.add_hparams(hparams, {f"val/{name}": value for name, value in metrics[cell.name].items()},
                               run_name=cell.name)


def csv_text(header: list[str], rows: list[list[Any]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


def shown(mean: float, std: float | None) -> str:
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def collect(sweep: Sweep, cells: list[Cell]) -> int:
    """Write the sweep's results from its finished cells; EXIT_PARTIAL when some cells are not finished."""
    config = sweep.config
    metrics = {cell.name: cell.metrics() for cell in cells if cell.finished()}
    names = list(dict.fromkeys([config.metric] + [name for values in metrics.values() for name in values]))
    missing = [cell.name for cell in cells if cell.name in metrics and config.metric not in metrics[cell.name]]
    if missing:
        raise UsageError(f"{sweep.source}: metric {config.metric!r} is not among the val metrics of {missing[0]} "
                         f"({', '.join(metrics[missing[0]])})")
    variants: dict[str, list[Cell]] = {}
    for cell in cells:
        variants.setdefault(cell.variant, []).append(cell)
    summary = {}
    for variant, members in variants.items():
        done = [metrics[cell.name] for cell in members if cell.name in metrics]
        summary[variant] = {name: mean_std([m[name] for m in done if name in m]) for name in names} if done else {}
    ranked = sorted((cell for cell in cells if cell.name in metrics), key=lambda c: -metrics[c.name][config.metric])
    ensemble = top_k_ensemble(sweep, ranked)

    repeat_keys = list(config.repeat)
    write_atomic(sweep.folder / "cells.csv", csv_text(
        ["cell", "variant", DATASET, *repeat_keys, "status", "run_dir", *names],
        [[cell.name, cell.variant, cell.dataset, *(cell.settings[key] for key in repeat_keys),
          "finished" if cell.name in metrics else "not finished", str(cell.run_dir),
          *(metrics.get(cell.name, {}).get(name, "") for name in names)] for cell in cells]))
    write_atomic(sweep.folder / "results.csv", csv_text(
        ["variant", DATASET, "settings", "cells", "finished", *(f"{n}_{s}" for n in names for s in ("mean", "std"))],
        [[variant, members[0].dataset, variant_settings(members[0], repeat_keys), len(members),
          sum(cell.name in metrics for cell in members),
          *(("" if value is None else value) for name in names for value in summary[variant].get(name, ("", "")))]
         for variant, members in variants.items()]))
    if ensemble is not None:
        write_json_atomic(sweep.folder / "ensemble.json", ensemble)
    if metrics:
        write_hparams(sweep, cells, metrics)
    markdown = results_markdown(sweep, cells, variants, summary, metrics, ranked, ensemble)
    write_atomic(sweep.folder / "results.md", markdown.encode())
    print(markdown, flush=True)
    return EXIT_OK if len(metrics) == len(cells) else EXIT_PARTIAL


def variant_settings(cell: Cell, repeat_keys: list[str]) -> str:
    """The settings that make a variant, as `key=value` (the repeat keys left out)."""
    return ", ".join(override(key, value) if key != DATASET else f"{key}={value}"
                     for key, value in cell.settings.items() if key not in repeat_keys)


def results_markdown(sweep: Sweep, cells: list[Cell], variants: dict[str, list[Cell]],
                     summary: dict[str, dict[str, tuple[float, float | None]]], metrics: dict[str, dict[str, float]],
                     ranked: list[Cell], ensemble: dict[str, Any] | None) -> str:
    config = sweep.config
    columns = list(dict.fromkeys([config.metric, "mean_pearson", "mse"]))
    repeats = " x ".join(f"{key} ({len(values)})" for key, values in config.repeat.items())
    lines = [f"# Sweep {config.name}", "",
             f"{len(cells)} cells ({len(variants)} variants" + (f" x {repeats}" if repeats else "") +
             f") from {sweep.source}, each a Stage II run of {sweep.base} with its settings; {len(metrics)} "
             f"finished. Val metrics of each cell's best epoch; mean ± sample std over the repeats.", "",
             "| variant | data | settings | cells | " + " | ".join(columns) + " |",
             "|---|---|---|---|" + "---|" * len(columns)]
    for variant, members in variants.items():
        done = sum(cell.name in metrics for cell in members)
        values = [shown(*summary[variant][name]) if name in summary[variant] else "-" for name in columns]
        lines.append(f"| {variant} | {members[0].dataset} | {variant_settings(members[0], list(config.repeat))} | "
                     f"{done}/{len(members)} | " + " | ".join(values) + " |")
    lines.append("")
    if ranked:
        best_variant = max((v for v in summary if summary[v]), key=lambda v: summary[v][config.metric][0])
        best = ranked[0]
        lines.append(f"Best variant by mean val {config.metric}: **{best_variant}** "
                     f"({shown(*summary[best_variant][config.metric])}). Best cell: **{best.name}** "
                     f"({metrics[best.name][config.metric]:.4f}, {best.run_dir / 'best'}).")
    if ensemble is not None:
        members = ", ".join(ensemble["members"])
        if "report" in ensemble:
            report = ensemble["report"]
            lines.append(f"Top-{len(ensemble['members'])} ensemble (the mean prediction of {members}, on "
                         f"{ensemble['val']}, {report['num_samples']} clips): mean_pearson "
                         f"{report['mean_pearson']:.4f}, mse {report['mse']:.4f}.")
        else:
            lines.append(f"Top-k ensemble of {members}: not computed ({ensemble['error']}).")
    unfinished = [cell.name for cell in cells if cell.name not in metrics]
    if unfinished:
        lines.append(f"Not finished ({len(unfinished)}): {', '.join(unfinished)}. Run the same `emi sweep` again to "
                     "continue them.")
    return "\n".join(lines) + "\n"
