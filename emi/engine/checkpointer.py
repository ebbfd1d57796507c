"""Resumable checkpoints: saved, verified, found and loaded (the records themselves: emi.formats.checkpoint).

A checkpoint is a folder `<run>/checkpoints/step-00000123/` holding what `accelerator.save_state` writes (model and
optimizer, DeepSpeed's partitioned files under ZeRO, every rank's RNG states) plus `trainer_state.json` (epoch, step,
batches consumed in the epoch, best metric), `ema.safetensors` when EMA is on, and `checkpoint.json`: the id of the
run that wrote it and the size and sha256 of every other file. It is written under a temporary name and renamed once
complete, so a killed job never leaves a checkpoint that looks complete.

Before a checkpoint is loaded every file is checked against `checkpoint.json` (the ranks hash a share each).
`latest` is the newest checkpoint that is intact and this run's own: a damaged newer one, or one whose run id is not
the run's (`<run>/run.json`), is moved aside to `damaged-step-...` with a warning naming it and why. Loading runs
DeepSpeed's own loader, which unpickles, so a checkpoint another run wrote is refused unless the user trusts it
explicitly. The folder is expected on storage every rank can see (a cluster's shared file system).

A checkpoint resumes on another number of processes than saved it too: DDP's files are whole, DeepSpeed's ZeRO
partitions are re-partitioned through DeepSpeed's universal checkpoint (emi.engine.reshard), and each rank's RNG then
starts from a seed of its own (the saved states were other ranks').
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, gather_object
from safetensors.torch import load_file, save_file

from emi.config import TrainSection
from emi.engine.reshard import load_resharded_deepspeed, universal_folder
from emi.errors import UsageError
from emi.formats.checkpoint import (
    RUN_FILE,
    CheckpointRecord,
    TrainerState,
    read_checkpoint_record,
    read_trainer_state,
    write_trainer_state,
)
from emi.io import file_problem, file_record, folder_files, replace_folder

EMA_FILE = "ema.safetensors"
RNG_FILE = "rng-rank{rank}.safetensors"  # accelerate keeps only the main process's RNG state on each node


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's committed checkpoints, oldest first (a checkpoint appears under its name only once complete)."""
    root = checkpoint_root(run_dir)
    return sorted(root.glob("step-*")) if root.is_dir() else []


@dataclass(frozen=True)
class Unusable:
    """Why a checkpoint cannot be resumed by this run."""

    reason: str  # "damaged (...)" or "another run's (...)", as the log says it
    foreign_run: str | None = None  # the id of the run that wrote it, when that is the reason


def resolve_resume(
    accelerator: Accelerator, run_dir: Path, resume: str, run_id: str, trust: bool
) -> tuple[Path | None, list[str]]:
    """(the checkpoint to resume from, warnings to log). Every rank calls this and gets the same answer.

    `none` -> None; `latest` -> the newest checkpoint that is intact and this run's own (or any intact one with
    `trust`), None when there is none at all; anything else must be an intact checkpoint, of this run unless
    trusted. Under `latest` the others are skipped and moved aside (rank 0), so that pruning never keeps them in
    place of intact ones; if none is usable, UsageError naming each and why."""
    if resume == "none":
        return None, []
    if resume != "latest":
        return _given_checkpoint(accelerator, Path(resume), run_id, trust), []
    unusable: list[tuple[Path, str]] = []
    found = None
    for candidate in reversed(checkpoints(run_dir)):
        problem = verify_checkpoint(accelerator, candidate, run_id, trust)
        if problem is None:
            found = candidate
            break
        unusable.append((candidate, problem.reason))
    if found is None and unusable:
        raise UsageError(
            f"no intact checkpoint to resume from in {checkpoint_root(run_dir)}: "
            + "; ".join(f"{path.name} is {problem}" for path, problem in unusable)
        )
    warnings = []
    for path, problem in unusable:
        aside = path.with_name(f"damaged-{path.name}")
        if accelerator.is_main_process:
            replace_folder(path, aside)
        warnings.append(f"checkpoint {path} is {problem}; moved aside to {aside.name}")
    accelerator.wait_for_everyone()
    return found, warnings


def _given_checkpoint(accelerator: Accelerator, path: Path, run_id: str, trust: bool) -> Path:
    """`--resume PATH`: the checkpoint, when it is intact and this run's own or trusted; UsageError otherwise."""
    if not path.is_dir():
        raise UsageError(f"--resume {path}: no such checkpoint folder")
    problem = verify_checkpoint(accelerator, path, run_id, trust)
    if problem is not None and problem.foreign_run is not None:
        raise UsageError(
            f"{path} was written by run {problem.foreign_run}, not by this run ({run_id}, in its "
            f"{RUN_FILE}). Resuming runs DeepSpeed's checkpoint loader, which unpickles: load a "
            "checkpoint from elsewhere only if you trust it as you would trust code, with "
            "--trust-checkpoint (train.trust_checkpoint=true)"
        )
    if problem is not None:
        raise UsageError(f"--resume {path}: the checkpoint is {problem.reason}")
    return path


def verify_checkpoint(accelerator: Accelerator, path: Path, run_id: str, trust: bool) -> Unusable | None:
    """Why checkpoint `path` cannot be resumed by this run (a damaged, missing or malformed file or record, or
    another run wrote it and `trust` is off); None when it can. Every rank calls this and gets the same answer."""
    record = read_checkpoint_record(path) if accelerator.is_main_process else None
    record = broadcast_object_list([record])[0]
    if isinstance(record, str):
        return Unusable(f"damaged ({record})")
    if record.run_id != run_id and not trust:
        return Unusable(
            f"another run's (written by run {record.run_id}, not by this run {run_id}; "
            "--trust-checkpoint resumes it anyway)",
            foreign_run=record.run_id,
        )
    names = sorted(record.files)
    share = names[accelerator.process_index :: accelerator.num_processes]
    problems = gather_object(
        [problem for name in share if (problem := file_problem(path, name, record.files[name])) is not None]
    )
    if not problems:
        return None
    more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
    return Unusable("damaged (" + "; ".join(sorted(problems)[:3]) + more + ")")


def save_checkpoint(
    accelerator: Accelerator,
    run_dir: Path,
    state: TrainerState,
    keep_last: int,
    run_id: str,
    ema: dict[str, torch.Tensor] | None = None,
) -> Path:
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
        write_trainer_state(tmp, state)
    accelerator.wait_for_everyone()
    # the size and sha256 of every file, the ranks hashing a share each
    names = broadcast_object_list([folder_files(tmp) if accelerator.is_main_process else None])[0]
    share = names[accelerator.process_index :: accelerator.num_processes]
    records = dict(gather_object([(name, file_record(tmp / name)) for name in share]))
    if accelerator.is_main_process:
        CheckpointRecord(run_id, records).write(tmp)
        replace_folder(tmp, final)
        prune_checkpoints(root, keep_last)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> tuple[TrainerState, dict[str, torch.Tensor] | None]:
    """Every rank calls this after `accelerator.prepare`; restores model, optimizer and RNG states. A checkpoint
    saved by another number of processes is re-partitioned (emi.engine.reshard) under DeepSpeed; DDP's files are
    whole already."""
    state = read_trainer_state(path)
    if saved_processes(path) == accelerator.num_processes:
        accelerator.load_state(str(path))
        _set_rng_state(load_file(str(path / RNG_FILE.format(rank=accelerator.process_index))))
    else:
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            load_resharded_deepspeed(accelerator, path)
        else:
            accelerator.load_state(str(path))
        # The saved states belong to other ranks' shares of the data: each rank starts a stream of its own instead,
        # the same for the same resume, so that a resumed run on this world size can be reproduced.
        _seed_rng(resharded_seed(state.step, accelerator.process_index))
    ema_path = path / EMA_FILE
    return state, (load_file(str(ema_path)) if ema_path.is_file() else None)


def saved_processes(path: Path) -> int:
    """How many processes saved checkpoint `path` (each wrote its RNG state)."""
    count = len(list(path.glob(RNG_FILE.format(rank="*"))))
    if count == 0:
        raise UsageError(f"{path}: no {RNG_FILE.format(rank='*')} files; not a checkpoint emi saved")
    return count


def resharded_seed(step: int, rank: int) -> int:
    """The torch seed of `rank` resuming at `step` on a world size other than the saved one."""
    return step * 100_003 + rank


def remove_stale_temporaries(run_dir: Path) -> None:
    """A job killed while saving leaves `.tmp-step-*` (never committed), one killed while converting a checkpoint
    for another number of processes `.universal-step-*` (emi.engine.reshard): both are safe to delete."""
    root = checkpoint_root(run_dir)
    for pattern in (".tmp-step-*", universal_folder(Path("step-*")).name):
        for tmp in root.glob(pattern) if root.is_dir() else []:
            shutil.rmtree(tmp, ignore_errors=True)


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _seed_rng(seed: int) -> None:
    torch.manual_seed(seed)  # the CUDA generators too


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (temporaries are remove_stale_temporaries')."""
    for old in sorted(root.glob("step-*"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


class Checkpointer:
    """The loop's checkpoints: resume where `train.resume` says, save every `checkpoint_every` steps and at each
    epoch end (unless `train.save` is off), keep the last `keep_last`. Every rank calls every method."""

    def __init__(self, accelerator: Accelerator, run_dir: Path, train: TrainSection, run_id: str) -> None:
        self.accelerator, self.run_dir, self.train, self.run_id = accelerator, run_dir, train, run_id

    def resume(self) -> tuple[Path | None, list[str]]:
        """(the checkpoint to resume from, warnings about the ones skipped)."""
        return resolve_resume(
            self.accelerator, self.run_dir, self.train.resume, self.run_id, self.train.trust_checkpoint
        )

    def load(self, path: Path) -> tuple[TrainerState, dict[str, torch.Tensor] | None]:
        return load_checkpoint(self.accelerator, path)

    def save(self, state: TrainerState, ema: dict[str, torch.Tensor] | None) -> None:
        if self.train.save:
            save_checkpoint(self.accelerator, self.run_dir, state, self.train.keep_last, self.run_id, ema)
