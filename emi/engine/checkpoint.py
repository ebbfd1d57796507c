"""Resumable checkpoints: saved, verified, found and loaded.

A checkpoint is a folder `<run>/checkpoints/step-00000123/` holding what `accelerator.save_state` writes (model and
optimizer, DeepSpeed's partitioned files under ZeRO, every rank's RNG states) plus `trainer_state.json` (epoch, step,
batches consumed in the epoch, best metric), `ema.safetensors` when EMA is on, and `checkpoint.json`: the id of the
run that wrote it and the size and sha256 of every other file. It is written under a temporary name and renamed once
complete, so a killed job never leaves a checkpoint that looks complete.

Before a checkpoint is loaded every file is checked against `checkpoint.json` (the ranks hash a share each).
`latest` is the newest intact checkpoint: a damaged newer one is moved aside to `damaged-step-...` with a warning
naming it and why. Loading runs DeepSpeed's own loader, which unpickles, so a checkpoint whose run id is not this
run's (`<run>/run.json`, written at the run's first start) is refused unless the user trusts it explicitly.
The folder is expected on storage every rank can see (a cluster's shared file system).
"""
from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from safetensors.torch import load_file, save_file

from emi.errors import UsageError
from emi.io import file_problem, file_record, folder_files, is_file_record, replace_folder, write_json_atomic

STATE_FILE = "trainer_state.json"
CHECKSUM_FILE = "checkpoint.json"
RUN_FILE = "run.json"  # in the run folder: the run's id, which every checkpoint it writes carries
EMA_FILE = "ema.safetensors"
RNG_FILE = "rng-rank{rank}.safetensors"  # accelerate keeps only the main process's RNG state on each node


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps completed
    epoch: int = 0  # the epoch in progress
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    best_metric: float | None = None
    best_step: int | None = None


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's committed checkpoints, oldest first (a checkpoint appears under its name only once complete)."""
    root = checkpoint_root(run_dir)
    return sorted(root.glob("step-*")) if root.is_dir() else []


def create_run_id(run_dir: Path) -> None:
    """Give the run its id at its first start (rank 0); later starts of the same run keep it."""
    if not (run_dir / RUN_FILE).is_file():
        write_json_atomic(run_dir / RUN_FILE, {"run_id": uuid.uuid4().hex})


def read_run_id(run_dir: Path) -> str:
    path = run_dir / RUN_FILE
    try:
        return str(json.loads(path.read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{path}: unreadable ({type(err).__name__}: {err}); it names the run that wrote the "
                         "checkpoints beside it") from None


def resolve_resume(accelerator: Accelerator, run_dir: Path, resume: str, run_id: str, trust: bool
                   ) -> tuple[Path | None, list[str]]:
    """(the checkpoint to resume from, warnings to log). Every rank calls this and gets the same answer.

    `none` -> None; `latest` -> the newest checkpoint that is intact and this run's own (or any intact one with
    `trust`), None when there is none at all; anything else must be an intact checkpoint, of this run unless
    trusted. Under `latest` the others are skipped and moved aside (rank 0), so that pruning never keeps them in
    place of intact ones; if none is usable, UsageError naming each and why."""
    if resume == "none":
        return None, []
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise UsageError(f"--resume {resume}: no such checkpoint folder")
        problem = verify_checkpoint(accelerator, path, run_id, trust)
        if problem is not None and problem.foreign_run is not None:
            raise UsageError(f"{path} was written by run {problem.foreign_run}, not by this run ({run_id}, in its "
                             f"{RUN_FILE}). Resuming runs DeepSpeed's checkpoint loader, which unpickles: load a "
                             "checkpoint from elsewhere only if you trust it as you would trust code, with "
                             "--trust-checkpoint (train.trust_checkpoint=true)")
        if problem is not None:
            raise UsageError(f"--resume {resume}: the checkpoint is {problem.reason}")
        return path, []
    unusable: list[tuple[Path, str]] = []
    found = None
    for candidate in reversed(checkpoints(run_dir)):
        problem = verify_checkpoint(accelerator, candidate, run_id, trust)
        if problem is None:
            found = candidate
            break
        unusable.append((candidate, problem.reason))
    if found is None and unusable:
        raise UsageError(f"no intact checkpoint to resume from in {checkpoint_root(run_dir)}: " + "; ".join(
            f"{path.name} is {problem}" for path, problem in unusable))
    warnings = []
    for path, problem in unusable:
        aside = path.with_name(f"damaged-{path.name}")
        if accelerator.is_main_process:
            replace_folder(path, aside)
        warnings.append(f"checkpoint {path} is {problem}; moved aside to {aside.name}")
    accelerator.wait_for_everyone()
    return found, warnings


@dataclass(frozen=True)
class Unusable:
    """Why a checkpoint cannot be resumed by this run."""

    reason: str  # "damaged (...)" or "another run's (...)", as the log says it
    foreign_run: str | None = None  # the id of the run that wrote it, when that is the reason


def verify_checkpoint(accelerator: Accelerator, path: Path, run_id: str, trust: bool) -> Unusable | None:
    """Why checkpoint `path` cannot be resumed by this run (a damaged, missing or malformed file or record, or
    another run wrote it and `trust` is off); None when it can. Every rank calls this and gets the same answer."""
    document = None
    if accelerator.is_main_process:
        document = _read_checksums(path)
    document = broadcast_object_list([document])[0]
    if isinstance(document, str):
        return Unusable(f"damaged ({document})")
    if document["run_id"] != run_id and not trust:
        return Unusable(f"another run's (written by run {document['run_id']}, not by this run {run_id}; "
                        "--trust-checkpoint resumes it anyway)", foreign_run=document["run_id"])
    names = sorted(document["files"])
    share = names[accelerator.process_index::accelerator.num_processes]
    problems = gather_object([problem for name in share
                              if (problem := file_problem(path, name, document["files"][name])) is not None])
    if not problems:
        return None
    more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
    return Unusable("damaged (" + "; ".join(sorted(problems)[:3]) + more + ")")


def _read_checksums(path: Path) -> dict[str, Any] | str:
    """The checkpoint's checksum document, or why it cannot be used."""
    try:
        document = json.loads((path / CHECKSUM_FILE).read_text())
    except FileNotFoundError:
        return f"no {CHECKSUM_FILE}: written by an older emi or another program"
    except (OSError, ValueError) as err:
        return f"{CHECKSUM_FILE}: unreadable ({type(err).__name__}: {err})"
    if not isinstance(document, dict) or not isinstance(document.get("files"), dict) or not isinstance(
            document.get("run_id"), str):
        return f"{CHECKSUM_FILE}: not a checksum record (a run_id and a files mapping)"
    for name, record in document["files"].items():
        if not is_file_record(record) or Path(name).is_absolute() or ".." in Path(name).parts:
            return f"{CHECKSUM_FILE}: file {name!r} has a malformed record {record!r}"
    return document


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: TrainerState, keep_last: int, run_id: str,
                    ema: dict[str, torch.Tensor] | None = None) -> Path:
    """Every rank calls this (DeepSpeed writes per-rank partitions); rank 0 commits by renaming."""
    root = checkpoint_root(run_dir)
    final = root / f"step-{state.step:08d}"
    tmp = root / f".tmp-step-{state.step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    save_file(_rng_state(), str(tmp / RNG_FILE.format(rank=accelerator.process_index)))
    if accelerator.is_main_process:
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp / EMA_FILE))
        write_json_atomic(tmp / STATE_FILE, asdict(state))
    accelerator.wait_for_everyone()
    # the size and sha256 of every file, the ranks hashing a share each
    names = broadcast_object_list([folder_files(tmp) if accelerator.is_main_process else None])[0]
    share = names[accelerator.process_index::accelerator.num_processes]
    records = dict(gather_object([(name, file_record(tmp / name)) for name in share]))
    if accelerator.is_main_process:
        write_json_atomic(tmp / CHECKSUM_FILE, {"run_id": run_id, "files": dict(sorted(records.items()))})
        replace_folder(tmp, final)
        prune_checkpoints(root, keep_last)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> tuple[TrainerState, dict[str, torch.Tensor] | None]:
    """Every rank calls this after `accelerator.prepare`; restores model, optimizer and RNG states."""
    accelerator.load_state(str(path))
    rng_path = path / RNG_FILE.format(rank=accelerator.process_index)
    if not rng_path.is_file():
        raise UsageError(f"{path}: no RNG state for rank {accelerator.process_index}; was it saved with a "
                         "different number of processes?")
    _set_rng_state(load_file(str(rng_path)))
    state = TrainerState(**json.loads((path / STATE_FILE).read_text()))
    ema_path = path / EMA_FILE
    return state, (load_file(str(ema_path)) if ema_path.is_file() else None)


def remove_stale_temporaries(run_dir: Path) -> None:
    """A job killed while saving leaves `.tmp-step-*`; it was never committed, so it is safe to delete."""
    root = checkpoint_root(run_dir)
    for tmp in root.glob(".tmp-step-*") if root.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (temporaries are remove_stale_temporaries')."""
    for old in sorted(root.glob("step-*"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
