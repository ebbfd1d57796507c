"""The manifest: `manifest.json` beside a folder of shards, the one description of what the shards hold.

    {"format": "emi-shards/1" | "emi-features/1", "split": "train",
     "shards": [{"name": "train-000000.tar", "num_samples": N, "bytes": B, "sha256": "...", "keys": [...]}, ...],
     "num_samples": total,
     "labels": {"Admiration": "float", "Expression": "str", ...},
     "preprocessing": {"fps": 5.0, "sample_rate": 16000, "frame_size": 256, "face_crop": "none", "asr": "none"},
     clip shards (emi shards build):      "num_frames", "duration_s" (totals), "args" (the build's arguments)
     feature shards (emi features extract): "dims" {"vision", "audio", "text"}, "encoders", "encoders_sha256" (one
                                            sha256 over the encoder files: emi.io.records_digest), "source"}

Written by `emi shards build` and `emi features extract` (atomically, through `write_manifest`), read by the
loaders (sample counts), Stage II (feature dims), `emi features extract`, `emi evaluate` and `emi predict` (how
clips were prepared), all through `read_manifest`, which checks it and names the file in every error.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

from emi.errors import UsageError
from emi.io import write_json_atomic

MANIFEST_FILE = "manifest.json"
CLIP_SHARDS = "emi-shards/1"
FEATURE_SHARDS = "emi-features/1"
FORMATS = (CLIP_SHARDS, FEATURE_SHARDS)


@dataclass(frozen=True)
class ShardEntry:
    name: str  # file name, relative to the manifest's folder
    num_samples: int
    bytes: int | None = None
    sha256: str | None = None
    keys: list[str] = field(default_factory=list)


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


@dataclass
class Manifest:
    format: str  # CLIP_SHARDS or FEATURE_SHARDS
    shards: list[ShardEntry]
    labels: dict[str, str]  # label name -> "float" | "str"
    preprocessing: Preprocessing
    split: str | None = None
    num_frames: int | None = None  # clip shards: totals over the shards
    duration_s: float | None = None
    args: dict[str, Any] | None = None  # clip shards: the build's arguments (a re-run with others rebuilds)
    dims: dict[str, int] | None = None  # feature shards: feature widths by modality
    encoders: str | None = None  # feature shards: the Stage I export that computed them
    encoders_sha256: str | None = None  # feature shards: its files' digest (emi.io.records_digest)
    source: str | None = None  # feature shards: the clip shards they came from
    path: Path | None = None  # where it was read from; not written

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

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {"format": self.format, "split": self.split,
                                    "shards": [asdict(entry) for entry in self.shards],
                                    "num_samples": self.num_samples, "labels": self.labels,
                                    "preprocessing": self.preprocessing.to_dict()}
        optional = {"num_frames": self.num_frames, "duration_s": self.duration_s, "args": self.args,
                    "dims": self.dims, "encoders": self.encoders, "encoders_sha256": self.encoders_sha256,
                    "source": self.source}
        document.update({key: value for key, value in optional.items() if value is not None})
        return document


def manifest_path(location: str | Path) -> Path:
    """The manifest file of a shard folder, or the file itself."""
    location = Path(location)
    return location / MANIFEST_FILE if location.is_dir() else location


def read_manifest(location: str | Path) -> Manifest:
    """The manifest of a shard folder (or the manifest file itself); UsageError naming the file and the reason."""
    path = manifest_path(location)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"manifest {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"manifest {path}: not readable JSON ({err})") from None
    if not isinstance(document, dict) or document.get("format") not in FORMATS:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise UsageError(f"manifest {path}: format is {found!r}, expected one of {list(FORMATS)}")
    if not isinstance(document.get("shards"), list):
        raise UsageError(f"manifest {path}: 'shards' must be a list")
    shards = []
    for entry in document["shards"]:
        count = entry.get("num_samples") if isinstance(entry, dict) else None
        if (not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(count, int)
                or isinstance(count, bool) or count < 0):
            raise UsageError(f"manifest {path}: bad shard entry {entry!r} (needs a name and num_samples >= 0)")
        known = {f.name for f in fields(ShardEntry)}
        shards.append(ShardEntry(**{key: value for key, value in entry.items() if key in known}))
    labels = document.get("labels", {})
    if not isinstance(labels, dict):
        raise UsageError(f"manifest {path}: 'labels' must map label names to kinds")
    if document["format"] == FEATURE_SHARDS:
        missing = [key for key in ("dims", "encoders", "preprocessing", "labels") if key not in document]
        if missing:
            raise UsageError(f"manifest {path}: no {missing} (written by an older emi); extract the features again")
    # clip manifests of earlier builds carry the preprocessing among the build arguments only
    prepared = document.get("preprocessing") or document.get("args") or {}
    try:
        preprocessing = Preprocessing.from_dict(prepared)
    except TypeError as err:
        raise UsageError(f"manifest {path}: bad preprocessing {prepared!r} ({err})") from None
    return Manifest(format=document["format"], shards=shards, labels=labels, preprocessing=preprocessing,
                    split=document.get("split"), num_frames=document.get("num_frames"),
                    duration_s=document.get("duration_s"), args=document.get("args"), dims=document.get("dims"),
                    encoders=document.get("encoders"), encoders_sha256=document.get("encoders_sha256"),
                    source=document.get("source"), path=path)


def find_manifest(folder: str | Path) -> Manifest | None:
    """The manifest of `folder`, None when it has none; UsageError when it has a bad one."""
    return read_manifest(folder) if (Path(folder) / MANIFEST_FILE).is_file() else None


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    """Write `folder/manifest.json` atomically (a crash leaves the previous one in place)."""
    path = Path(folder) / MANIFEST_FILE
    write_json_atomic(path, manifest.to_json())
    return path
