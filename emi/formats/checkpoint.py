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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from emi.errors import UsageError
from emi.io import is_file_record, write_json_atomic

STATE_FILE = "trainer_state.json"
CHECKSUM_FILE = "checkpoint.json"
RUN_FILE = "run.json"


@dataclass(frozen=True)
class Layout:
    """How a run deals out its data and steps: processes, dataloader workers per process, samples per micro-batch on
    each process, micro-batches per optimizer step."""

    world_size: int
    num_workers: int
    batch_size: int
    grad_accum: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size * self.grad_accum

    def describe(self) -> str:
        return (
            f"{self.world_size} processes x batch {self.batch_size} x grad_accum {self.grad_accum} "
            f"(global batch {self.global_batch}), {self.num_workers} workers each"
        )


@dataclass(frozen=True)
class Stretch:
    """A part of an epoch trained under one layout, ended by a resume under another: `batches` micro-batches on each
    process."""

    layout: Layout
    batches: int


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps completed
    epoch: int = 0  # the epoch in progress
    batch_in_epoch: int = 0  # micro-batches consumed on each process in the epoch's current stretch
    best_metric: float | None = None
    best_step: int | None = None
    layout: Layout | None = None  # the layout that wrote the checkpoint (None: an emi that did not record it)
    stretches: list[Stretch] = field(default_factory=list)  # the epoch's earlier stretches, under other layouts


def write_trainer_state(folder: Path, state: TrainerState) -> None:
    write_json_atomic(folder / STATE_FILE, asdict(state))


def read_trainer_state(folder: Path) -> TrainerState:
    """The state a checkpoint records (its file was verified against checkpoint.json before); UsageError naming the
    file when it is not a trainer state."""
    path = folder / STATE_FILE
    try:
        document = json.loads(path.read_text())
        known = {f.name for f in fields(TrainerState)}
        values = {name: value for name, value in document.items() if name in known}
        if values.get("layout") is not None:
            values["layout"] = Layout(**values["layout"])
        values["stretches"] = [
            Stretch(Layout(**stretch["layout"]), int(stretch["batches"])) for stretch in values.get("stretches", [])
        ]
        return TrainerState(**values)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise UsageError(f"{path}: not a trainer state ({type(err).__name__}: {err})") from None


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
