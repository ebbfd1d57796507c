"""The sample record of a run (`train.record_samples`): which samples each process trained on, batch by batch.

    <run>/samples/rank-00000.jsonl   one line per micro-batch: {"epoch": 0, "step": 1, "processes": 2, "keys": [...]}

`step` is the optimizer step the batch went into (1 for the first). A process appends to the file of its rank, so
after a resume on another number of processes one rank's file holds lines of several layouts; `processes` says which.
On resume the lines of steps past the checkpoint are dropped (those batches are trained again), so the record holds
exactly the batches the checkpointed weights saw.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from emi.errors import UsageError

SAMPLES_DIR = "samples"


@dataclass(frozen=True)
class BatchRecord:
    epoch: int
    step: int
    processes: int
    keys: list[str]


def record_path(run_dir: Path, rank: int) -> Path:
    return run_dir / SAMPLES_DIR / f"rank-{rank:05d}.jsonl"


class SampleRecorder:
    """Appends this process's batches to its record file, a line each, flushed so that a killed run keeps them."""

    def __init__(self, run_dir: Path, rank: int) -> None:
        path = record_path(run_dir, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file: IO[str] = path.open("a")

    def add(self, record: BatchRecord) -> None:
        self.file.write(json.dumps(asdict(record)) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_records(path: Path) -> list[BatchRecord]:
    """The batches of one record file; UsageError naming the file and line of one that is not a batch record."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            document = json.loads(line)
            records.append(
                BatchRecord(
                    int(document["epoch"]),
                    int(document["step"]),
                    int(document["processes"]),
                    [str(key) for key in document["keys"]],
                )
            )
        except (ValueError, KeyError, TypeError) as err:
            raise UsageError(f"{path}:{number}: not a batch record ({type(err).__name__}: {err})") from None
    return records


def read_run_records(run_dir: Path) -> list[BatchRecord]:
    """Every process's batches of a run."""
    return [record for path in sorted((run_dir / SAMPLES_DIR).glob("rank-*.jsonl")) for record in read_records(path)]


def drop_records_after(run_dir: Path, step: int) -> None:
    """Remove the lines of steps past `step` from every record file of the run (a resume from step `step`)."""
    for path in sorted((run_dir / SAMPLES_DIR).glob("rank-*.jsonl")):
        kept = [record for record in read_records(path) if record.step <= step]
        path.write_text("".join(json.dumps(asdict(record)) + "\n" for record in kept))
