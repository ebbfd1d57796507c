"""The manifest: `manifest.json` beside a folder of shards, the one description of what the shards hold.

    {"format": "emi-shards/1" | "emi-features/1", "split": "train",
     "shards": [{"name": "train-000000.tar", "num_samples": N, "bytes": B, "sha256": "...", "keys": [...]}, ...],
     "num_samples": total,
     "labels": {"Admiration": "float", "Expression": "str", ...},
     "preprocessing": {"fps": 5.0, "sample_rate": 16000, "frame_size": 256, "face_crop": "none", "asr": "none"},
     clip shards (emi shards build):      "num_frames", "duration_s" (totals), "args" (the build's arguments)
     feature shards (emi features extract): "dims" {"vision", "audio", "text"}, "encoders", "encoders_sha256" (one
                                            sha256 over the encoder files: emi.io.records_digest), "source"}

A partial manifest is what one task of a job-array build (`emi shards build --num-tasks N --task-index I`) writes
to `.emi-tasks/task-IIIII-of-NNNNN.json` in the output folder: a clip manifest of the shards that task built, plus
    "task": {"index": I, "count": N, "first_shard": F, "num_shards": S, "complete": true|false},
    "failures": [the failures.jsonl records: the labels' and the task's own clips'],
and `emi shards merge` turns the N of them into the one manifest.json and failures.jsonl.

Written by `emi shards build` and `emi features extract` (atomically, through `write_manifest`), read by the
loaders (sample counts), Stage II (feature dims), `emi features extract`, `emi evaluate` and `emi predict` (how
clips were prepared), all through `read_manifest`, which checks it and names the file in every error.

A feature shard being extracted gets its sidecar `<name>.tar.json` (its ShardEntry) once it is whole: a re-run
keeps the shards whose sidecar matches them (`read_sidecar`, `write_sidecar`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

from emi import storage
from emi.errors import UsageError

MANIFEST_FILE = "manifest.json"
CLIP_SHARDS = "emi-shards/1"
FEATURE_SHARDS = "emi-features/1"
FORMATS = (CLIP_SHARDS, FEATURE_SHARDS)
TASKS_DIR = ".emi-tasks"  # the partial manifests of a job-array build, inside its output folder


@dataclass(frozen=True)
class ShardEntry:
    name: str  # file name, relative to the manifest's folder
    num_samples: int
    bytes: int | None = None
    sha256: str | None = None
    keys: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TaskPart:
    """Which shards one task of a job-array build owns (`first_shard` .. + `num_shards`), and whether it has
    built all of them."""

    index: int
    count: int
    first_shard: int
    num_shards: int
    complete: bool


def partial_manifest_name(index: int, count: int) -> str:
    return f"{TASKS_DIR}/task-{index:05d}-of-{count:05d}.json"


@dataclass(frozen=True)
class Preprocessing:
    """How raw clips became samples; `emi predict` prepares a raw video the same way."""

    fps: float = 5.0
    sample_rate: int = 16000
    frame_size: int = 256
    face_crop: str = "none"
    asr: str = "none"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        return cls(**{f.name: values[f.name] for f in fields(cls) if values.get(f.name) is not None})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BuildArgs:
    """The arguments of `emi shards build` that decide what its shards hold; a re-run with others rebuilds them."""

    videos: str  # the videos folder (absolute) or URL prefix
    labels: str  # the labels CSV (absolute)
    labels_sha256: str
    split: str
    fps: float
    sample_rate: int
    frame_size: int
    shard_size: int
    asr: str
    transcripts: str | None
    transcripts_sha256: str | None
    face_crop: str

    @classmethod
    def from_dict(cls, values: Any) -> BuildArgs | None:
        """The arguments a manifest records; None where they are not of this shape (an older emi wrote other ones:
        a build run again over them rebuilds, as it does for any change of arguments)."""
        names = [f.name for f in fields(cls)]
        if not isinstance(values, dict) or sorted(values) != sorted(names):
            return None
        try:
            return cls(**values)
        except TypeError:
            return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(
            fps=self.fps,
            sample_rate=self.sample_rate,
            frame_size=self.frame_size,
            face_crop=self.face_crop,
            asr=self.asr,
        )


@dataclass
class Manifest:
    format: str  # CLIP_SHARDS or FEATURE_SHARDS
    shards: list[ShardEntry]
    labels: dict[str, str]  # label name -> "float" | "str"
    preprocessing: Preprocessing
    split: str | None = None
    num_frames: int | None = None  # clip shards: totals over the shards
    duration_s: float | None = None
    args: BuildArgs | None = None  # clip shards: the build's arguments (a re-run with others rebuilds)
    dims: dict[str, int] | None = None  # feature shards: feature widths by modality
    encoders: str | None = None  # feature shards: the Stage I export that computed them
    encoders_sha256: str | None = None  # feature shards: its files' digest (emi.io.records_digest)
    source: str | None = None  # feature shards: the clip shards they came from
    task: TaskPart | None = None  # partial manifests only: the task that wrote it
    failures: list[dict[str, Any]] | None = None  # partial manifests only: the failures.jsonl records
    path: str | Path | None = None  # where it was read from; not written

    @property
    def num_samples(self) -> int:
        return sum(entry.num_samples for entry in self.shards)

    @property
    def is_features(self) -> bool:
        return self.format == FEATURE_SHARDS

    @property
    def float_labels(self) -> list[str]:
        return [name for name, kind in self.labels.items() if kind == "float"]

    @cached_property
    def counts(self) -> dict[str, int]:
        """Shard name -> samples (computed once: resolving thousands of shards looks each one up)."""
        return {entry.name: entry.num_samples for entry in self.shards}

    @cached_property
    def _entries(self) -> dict[str, ShardEntry]:
        return {entry.name: entry for entry in self.shards}

    def entry(self, name: str) -> ShardEntry:
        """The entry of the shard file `name` (KeyError when not listed)."""
        return self._entries[name]

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "format": self.format,
            "split": self.split,
            "shards": [asdict(entry) for entry in self.shards],
            "num_samples": self.num_samples,
            "labels": self.labels,
            "preprocessing": self.preprocessing.to_dict(),
        }
        optional = {
            "num_frames": self.num_frames,
            "duration_s": self.duration_s,
            "args": self.args.to_dict() if self.args is not None else None,
            "dims": self.dims,
            "encoders": self.encoders,
            "encoders_sha256": self.encoders_sha256,
            "source": self.source,
            "task": asdict(self.task) if self.task is not None else None,
            "failures": self.failures,
        }
        document.update({key: value for key, value in optional.items() if value is not None})
        return document


def manifest_path(location: str | Path) -> str | Path:
    """The manifest file of a shard folder (a local one, or a URL prefix), or the file itself."""
    if storage.is_url(location):
        return location if str(location).endswith(".json") else storage.join(location, MANIFEST_FILE)
    location = Path(location)
    return location / MANIFEST_FILE if location.is_dir() else location


def read_manifest(location: str | Path) -> Manifest:
    """The manifest of a shard folder (or the manifest file itself, local or a URL); UsageError naming the file
    and the reason."""
    path = manifest_path(location)
    shown = storage.shown(path)
    try:
        document = json.loads(storage.read_bytes(path).decode("utf-8"))
    except FileNotFoundError:
        raise UsageError(f"manifest {shown}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"manifest {shown}: not readable JSON ({err})") from None
    if not isinstance(document, dict) or document.get("format") not in FORMATS:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise UsageError(f"manifest {shown}: format is {found!r}, expected one of {list(FORMATS)}")
    if not isinstance(document.get("shards"), list):
        raise UsageError(f"manifest {shown}: 'shards' must be a list")
    shards = []
    for entry in document["shards"]:
        count = entry.get("num_samples") if isinstance(entry, dict) else None
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("name"), str)
            or not isinstance(count, int)
            or isinstance(count, bool)
            or count < 0
        ):
            raise UsageError(f"manifest {shown}: bad shard entry {entry!r} (needs a name and num_samples >= 0)")
        known = {f.name for f in fields(ShardEntry)}
        shards.append(ShardEntry(**{key: value for key, value in entry.items() if key in known}))
    labels = document.get("labels", {})
    if not isinstance(labels, dict):
        raise UsageError(f"manifest {shown}: 'labels' must map label names to kinds")
    if document["format"] == FEATURE_SHARDS:
        missing = [key for key in ("dims", "encoders", "preprocessing", "labels") if key not in document]
        if missing:
            raise UsageError(f"manifest {shown}: no {missing} (written by an older emi); extract the features again")
    # clip manifests of earlier builds carry the preprocessing among the build arguments only
    prepared = document.get("preprocessing") or document.get("args") or {}
    try:
        preprocessing = Preprocessing.from_dict(prepared)
    except TypeError as err:
        raise UsageError(f"manifest {shown}: bad preprocessing {prepared!r} ({err})") from None
    task = document.get("task")
    if task is not None:
        try:
            task = TaskPart(**task)
        except TypeError as err:
            raise UsageError(f"manifest {shown}: bad task {task!r} ({err})") from None
        if not isinstance(document.get("failures"), list):
            raise UsageError(f"manifest {shown}: a partial manifest needs its 'failures' list")
    return Manifest(
        format=document["format"],
        shards=shards,
        labels=labels,
        preprocessing=preprocessing,
        split=document.get("split"),
        num_frames=document.get("num_frames"),
        duration_s=document.get("duration_s"),
        args=BuildArgs.from_dict(document.get("args")),
        dims=document.get("dims"),
        encoders=document.get("encoders"),
        encoders_sha256=document.get("encoders_sha256"),
        source=document.get("source"),
        task=task,
        failures=document.get("failures"),
        path=path,
    )


def find_manifest(folder: str | Path) -> Manifest | None:
    """The manifest of `folder` (a local folder or a URL prefix), None when it has none; UsageError when it has a
    bad one."""
    return read_manifest(folder) if storage.exists(storage.join(folder, MANIFEST_FILE)) else None


def write_manifest(folder: str | Path, manifest: Manifest, name: str = MANIFEST_FILE) -> str | Path:
    """Write `folder/manifest.json` (or `name`) atomically: a crash leaves the previous one in place."""
    path = storage.join(folder, name)
    storage.write_bytes(path, (json.dumps(manifest.to_json(), indent=1, ensure_ascii=False) + "\n").encode())
    return path


def sidecar_path(shard: str | Path) -> str | Path:
    """The sidecar of a feature shard: `<name>.tar.json` beside it (a path or a URL)."""
    return f"{shard}.json" if storage.is_url(str(shard)) else Path(f"{shard}.json")


def write_sidecar(shard: str | Path, entry: ShardEntry) -> None:
    """Record a finished feature shard (its count, bytes, sha256 and keys) beside it, once it is whole."""
    storage.write_bytes(sidecar_path(shard), (json.dumps(asdict(entry), indent=1, ensure_ascii=False) + "\n").encode())


def read_sidecar(shard: str | Path) -> ShardEntry | None:
    """The entry a feature shard's sidecar records; None where there is none or it is damaged (the shard is then
    extracted again)."""
    try:
        document = json.loads(storage.read_bytes(sidecar_path(shard)))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(document, dict):
        return None
    try:
        entry = ShardEntry(**document)
    except TypeError:
        return None
    valid = (
        isinstance(entry.name, str)
        and isinstance(entry.num_samples, int)
        and isinstance(entry.bytes, int)
        and isinstance(entry.sha256, str)
        and isinstance(entry.keys, list)
    )
    return entry if valid else None
