"""The records of a training run and its checkpoints.

    <run>/run.json                          {"run_id": "<hex>"}: given at the run's first start, kept after
    <run>/checkpoints/step-N/trainer_state.json   TrainerState: where the run stands
    <run>/checkpoints/step-N/checkpoint.json      {"run_id", "files": {relative path: {"bytes", "sha256"}}}: the run
                                                  that wrote the checkpoint and every other file of it, as written

The rest of a checkpoint folder is what `accelerator.save_state` writes (emi.engine.checkpointer).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from emi.errors import UsageError
from emi.io import is_file_record, write_json_atomic

STATE_FILE = "trainer_state.json"
CHECKSUM_FILE = "checkpoint.json"
RUN_FILE = "run.json"


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps completed
    epoch: int = 0  # the epoch in progress
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    best_metric: float | None = None
    best_step: int | None = None


def write_trainer_state(folder: Path, state: TrainerState) -> None:
    write_json_atomic(folder / STATE_FILE, asdict(state))


def read_trainer_state(folder: Path) -> TrainerState:
    """The state a checkpoint records (its file was verified against checkpoint.json before)."""
    document = json.loads((folder / STATE_FILE).read_text())
    known = {f.name for f in fields(TrainerState)}
    return TrainerState(**{name: value for name, value in document.items() if name in known})


@dataclass(frozen=True)
class CheckpointRecord:
    run_id: str
    files: dict[str, dict[str, Any]]  # relative path -> emi.io.file_record

    def write(self, folder: Path) -> None:
        write_json_atomic(folder / CHECKSUM_FILE, {"run_id": self.run_id, "files": dict(sorted(self.files.items()))})


def read_checkpoint_record(folder: Path) -> CheckpointRecord | str:
    """A checkpoint's record, or why it cannot be used (the checkpoint then counts as damaged)."""
    try:
        document = json.loads((folder / CHECKSUM_FILE).read_text())
    except FileNotFoundError:
        return f"no {CHECKSUM_FILE}: written by an older emi or another program"
    except (OSError, ValueError) as err:
        return f"{CHECKSUM_FILE}: unreadable ({type(err).__name__}: {err})"
    if (
        not isinstance(document, dict)
        or not isinstance(document.get("files"), dict)
        or not isinstance(document.get("run_id"), str)
    ):
        return f"{CHECKSUM_FILE}: not a checksum record (a run_id and a files mapping)"
    for name, record in document["files"].items():
        if not is_file_record(record) or Path(name).is_absolute() or ".." in Path(name).parts:
            return f"{CHECKSUM_FILE}: file {name!r} has a malformed record {record!r}"
    return CheckpointRecord(document["run_id"], document["files"])


def create_run_id(run_dir: Path) -> None:
    """Give the run its id at its first start; later starts of the same run keep it."""
    if not (run_dir / RUN_FILE).is_file():
        write_json_atomic(run_dir / RUN_FILE, {"run_id": uuid.uuid4().hex})


def read_run_id(run_dir: Path) -> str:
    path = run_dir / RUN_FILE
    try:
        return str(json.loads(path.read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(
            f"{path}: unreadable ({type(err).__name__}: {err}); it names the run that wrote the checkpoints beside it"
        ) from None
